"""Maps the design card's top-level folders into the one `ddpm_plugin` namespace, with every sub-package found
by `find_packages`, so no module can be left out of the wheel (metadata is in pyproject.toml). A build also
copies the onnxruntime-web files the browser page loads into the package (see `BuildPy`)."""

import ast
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# import name -> folder in the repository
ROOTS = {
    "ddpm_plugin": "ddpm_plugin",
    "ddpm_plugin.pipelines": "pipelines",
    "ddpm_plugin.export": "export",
    "ddpm_plugin.demo": "demo",
}
WEB_SITE = Path(__file__).parent / "demo" / "web" / "site.py"
ORT_DIST = WEB_SITE.parent / "node_modules" / "onnxruntime-web" / "dist"  # `npm ci --prefix demo/web`
ORT_PACKAGED = "ddpm_plugin/demo/web/ort"  # where site.py's `find_ort_dist` looks in an installed package


def ort_files() -> tuple[str, ...]:
    """`ORT_FILES` of demo/web/site.py, read without importing the package (its dependencies are not installed
    in the build environment)."""
    for node in ast.parse(WEB_SITE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "ORT_FILES" for target in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{WEB_SITE} defines no ORT_FILES")


class BuildPy(build_py):
    """`build_py`, then exactly the onnxruntime-web files the browser page loads copied from npm's node_modules
    into the built package, when `npm ci` has installed them; without them the wheel's page route says how to
    get them. Editable installs skip the copy: their page reads node_modules itself."""

    def run(self) -> None:
        super().run()
        names = ort_files()
        target = Path(self.build_lib) / ORT_PACKAGED
        shutil.rmtree(target, ignore_errors=True)  # build/lib outlives builds: no stale copy may go into a wheel
        if self.editable_mode or not all((ORT_DIST / name).is_file() for name in names):
            return
        target.mkdir(parents=True)
        for name in names:
            shutil.copyfile(ORT_DIST / name, target / name)


package_dir = dict(ROOTS)
packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir, cmdclass={"build_py": BuildPy})
