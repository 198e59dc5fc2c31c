"""Dependencies run one way: cli -> demo -> export -> core (ddpm_plugin/*.py) -> pipelines.

`setup.py` maps the top-level folders into the one `ddpm_plugin` namespace, so a static import graph of the
repository misses the edges between them; this test reads every module's imports with `ast` (imports inside
functions count) and maps each file to its import name through setup.py's `ROOTS`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
# From the user-facing layer down; a module may import its own layer and those after it.
LAYERS = ("ddpm_plugin.cli", "ddpm_plugin.demo", "ddpm_plugin.export", "ddpm_plugin", "ddpm_plugin.pipelines")
LAYER_NAMES = ("cli", "demo", "export", "core", "pipelines")
# (importing module, imported module) -> why this upward import stays. Keep it short.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def setup_roots(repository: Path) -> dict[str, str]:
    """setup.py's `ROOTS` (import name -> folder), read without running setup.py."""
    for node in ast.parse((repository / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "ROOTS" for target in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no ROOTS")


def modules(repository: Path) -> dict[str, tuple[Path, bool]]:
    """Import name -> (file, is a package's __init__) of every module the wheel ships."""
    roots = setup_roots(repository)
    found = {}
    for package, folder in roots.items():
        for path in sorted((repository / folder).rglob("*.py")):
            parts = path.relative_to(repository / folder).with_suffix("").parts
            if any(not part.isidentifier() for part in parts):
                continue  # node_modules, and the bundled models' copies of the pipeline files (data, not modules)
            name = ".".join([package, *(part for part in parts if part != "__init__")])
            if any(name.startswith(other + ".") or name == other for other in roots if len(other) > len(package)):
                continue  # a folder mapped to a longer import name is listed under that name
            found[name] = (path, path.name == "__init__.py")
    return found


def layer_of(name: str) -> int | None:
    """Index in `LAYERS` of the longest layer prefix of the module `name`."""
    matches = [i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")]
    return max(matches, key=lambda i: len(LAYERS[i])) if matches else None


def imports(name: str, path: Path, is_package: bool) -> list[tuple[str, int]]:
    """(imported ddpm_plugin module, line) of every import in the file, relative ones resolved."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            # `from package import module` imports the module; `from module import name` the module itself.
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return [(target, line) for target, line in found if target.startswith("ddpm_plugin")]


def edges(repository: Path) -> list[tuple[str, str, int]]:
    """(importing module, imported module or name, line) between ddpm_plugin modules."""
    return [(name, target, line) for name, (path, is_package) in modules(repository).items()
            for target, line in imports(name, path, is_package)]


def upward_imports(repository: Path) -> list[str]:
    """Each import of a higher layer by a lower one, not in `EXCEPTIONS`, as a line."""
    found = []
    for name, target, line in edges(repository):
        source_layer, target_layer = layer_of(name), layer_of(target)
        if target_layer < source_layer and (name, target.rpartition(".")[0]) not in EXCEPTIONS \
                and (name, target) not in EXCEPTIONS:
            found.append(f"{name} ({LAYER_NAMES[source_layer]}) imports {target} ({LAYER_NAMES[target_layer]}), line {line}")
    return found


def test_no_layer_imports_a_higher_one():
    assert upward_imports(REPOSITORY) == []


def test_no_two_layers_import_each_other():
    pairs = {(layer_of(name), layer_of(target)) for name, target, _ in edges(REPOSITORY)}
    both_ways = sorted({tuple(sorted((LAYER_NAMES[a], LAYER_NAMES[b]))) for a, b in pairs if a != b and (b, a) in pairs})
    assert both_ways == []


def test_every_exception_is_still_needed_and_justified():
    used = {(name, target) for name, target, _ in edges(REPOSITORY)}
    used |= {(name, target.rpartition(".")[0]) for name, target in used}
    for (name, target), reason in EXCEPTIONS.items():
        assert (name, target) in used, f"EXCEPTIONS lists {name} -> {target}, which is no longer imported"
        assert reason.strip() and "\n" not in reason


def test_every_module_is_in_a_layer():
    names = modules(REPOSITORY)
    assert {"ddpm_plugin.sampling", "ddpm_plugin.export.sampler", "ddpm_plugin.demo.backends",
            "ddpm_plugin.pipelines.pipeline_ddpm_paper", "ddpm_plugin.cli.sample"} <= set(names)
    assert all(layer_of(name) is not None for name in names)


def test_the_check_sees_an_upward_import_inside_a_function(tmp_path):
    """A lazy import of the export layer in a core module is caught, as it is in the shipped layout."""
    (tmp_path / "setup.py").write_text((REPOSITORY / "setup.py").read_text())
    for folder in setup_roots(REPOSITORY).values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "ddpm_plugin" / "sampling.py").write_text(
        "def open():\n    from .export.onnx_pipeline import OnnxDDPMPipeline\n    return OnnxDDPMPipeline\n")
    (tmp_path / "export" / "onnx_pipeline.py").write_text("from ..sampling import open\n")
    assert upward_imports(tmp_path) == [
        "ddpm_plugin.sampling (core) imports ddpm_plugin.export.onnx_pipeline.OnnxDDPMPipeline (export), line 2"]


@pytest.mark.parametrize("module", ["ddpm_plugin.sampling", "ddpm_plugin.export.sampler", "ddpm_plugin.sample_shards",
                                    "ddpm_plugin.hub"])
def test_opening_a_sampler_imports_neither_torch_nor_onnxruntime(module):
    code = (f"import sys, {module}\n"
            "print(sorted(name for name in ('torch', 'onnxruntime', 'diffusers') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
