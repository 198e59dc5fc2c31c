"""Every code block of README.md and docs/*.md runs as written.

Tool: a small extractor of our own, because each block must run in a subprocess (Python blocks with .venv's python,
bash blocks with bash, from a temp dir, with .venv/bin on PATH) and skip only behind a reasoned HTML comment, which
none of pytest-markdown-docs, sybil or mktestdocs does without a plugin of about the same size.

A block is a fenced ```python or ```bash block. The blocks of one page run in order in one temp dir (a later block
may use what an earlier one wrote, as a reader following the page would). A block that cannot run here is marked
on the line before its fence with `<!-- docs-test: skip (reason) -->`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash"}
MAX_SKIPS = 8  # blocks that need a GPU, the real Hub, the registry or run forever; keep this small
BLOCK_TIMEOUT = 300
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of `page`, each with the skip reason written on the line before its fence, if any."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append(
            Block(
                page=page,
                line=text.count("\n", 0, match.start()) + 1,
                language=match.group(1).strip(),
                code=match.group(2),
                skip_reason=skip.group("reason").strip() if skip else None,
            )
        )
    return blocks


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def test_every_block_is_python_or_bash_and_skips_are_few_and_reasoned() -> None:
    assert BLOCKS, "no code blocks found"
    unknown = [f"{block.name} ({block.language or 'no language'})" for block in BLOCKS if block.language not in LANGUAGES]
    assert not unknown, f"code blocks must be ```python or ```bash to be tested: {unknown}"
    skipped = [block for block in BLOCKS if block.skip_reason is not None]
    assert len(skipped) <= MAX_SKIPS, f"{len(skipped)} skipped blocks, at most {MAX_SKIPS}: {[b.name for b in skipped]}"
    assert all(len(block.skip_reason) >= 10 for block in skipped), "each skip needs a reason"
    stray = [
        f"{page.relative_to(ROOT)}:{number}"
        for page in PAGES
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if "docs-test" in line and not SKIP.search(line)
    ]
    assert not stray, f"malformed docs-test comments: {stray}"


def test_readme_is_a_guide_of_at_most_20000_bytes() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 20_000


LINK = re.compile(r"\]\((?!https?://)(?P<target>[^)#\s]*)(?:#(?P<anchor>[\w-]+))?\)")


def anchors_of(page: Path) -> set[str]:
    """GitHub's anchors of `page`'s headings: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_relative_links_and_anchors_resolve() -> None:
    broken = []
    for page in PAGES:
        for match in LINK.finditer(page.read_text(encoding="utf-8")):
            target = (page.parent / match.group("target")).resolve() if match.group("target") else page
            anchor = match.group("anchor")
            if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors_of(target)):
                broken.append(f"{page.relative_to(ROOT)}: {match.group(0)}")
    assert not broken, f"links that lead nowhere: {broken}"


@pytest.fixture(scope="module")
def page_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    """One temp dir per page, shared by its blocks in order."""
    return {page: tmp_path_factory.mktemp(page.stem) for page in PAGES}


VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


def run_block(block: Block, folder: Path) -> subprocess.CompletedProcess:
    """Run `block` in `folder` as a reader would: .venv's python, or bash with .venv/bin first on PATH (so `ddpm`,
    `python` and `accelerate` are the venv's). The Hub is set offline: no block may need the network."""
    venv_bin = Path(PYTHON).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    if block.language == "python":
        script = folder / f"block_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        command = [PYTHON, str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    return subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL
    )


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language in LANGUAGES], ids=lambda block: block.name)
def test_block_runs_as_written(block: Block, page_folders: dict[Path, Path]) -> None:
    if block.skip_reason is not None:
        pytest.skip(block.skip_reason)
    result = run_block(block, page_folders[block.page])
    assert result.returncode == 0, (
        f"{block.name} ({block.language}) exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-5000:]}"
    )
