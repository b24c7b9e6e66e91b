"""The docs cannot rot: every runnable block runs, the site builds strictly, and the README stays one page.

A fenced code block preceded by the line `<!-- docs: run -->` (in README.md or docs/**.md) is run here, one test per
block named `FILE:LINE`: bash blocks with `bash -euo pipefail`, python blocks with this interpreter. Each runs in a
fresh temporary directory holding `powersample`, `tests` and `integrations` (links to the repository's folders, so
`powersample/toy_specs/...` and `tests/data/...` resolve and `import powersample` finds this checkout) and a
`powersample` command on the PATH that runs this checkout's CLI. HOME and POWERSAMPLE_CACHE are left alone: the
blocks run on the toy backend, which caches nothing, and a fresh cache would make any block that did load the
embedded model convert it again (about 20 s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- docs: run -->"
README_LIMIT = 12 * 1024  # bytes: the README is one page; everything else lives in docs/
BLOCK_TIMEOUT = 120  # seconds; a runnable block takes a second or two on the toy backend
LINKED = ("powersample", "tests", "integrations")  # what a block may read: toy specs, test data, custom_generate
RUNNERS = {"bash": ["bash", "-euo", "pipefail"], "python": [sys.executable]}


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str  # "bash" or "python"
    code: str


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def runnable_blocks(path: Path) -> list[Block]:
    """The fenced blocks of one file that follow the marker line (blank lines between them allowed)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, armed, i = [], False, 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped == MARKER:
            armed = True
        elif armed and stripped.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append(
                Block(str(path.relative_to(ROOT)), i + 1, stripped[3:].strip(), "\n".join(lines[i + 1 : end]))
            )
            armed, i = False, end
        elif stripped:
            armed = False
        i += 1
    return blocks


BLOCKS = [block for path in doc_files() for block in runnable_blocks(path)]


def sandbox(tmp_path: Path) -> dict[str, str]:
    """The block's directory: the package linked in, a `powersample` command for this checkout; returns the env."""
    for linked in LINKED:
        (tmp_path / linked).symlink_to(ROOT / linked, target_is_directory=True)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "powersample"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m powersample.cli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return env


def test_there_are_runnable_blocks():
    assert len(BLOCKS) >= 8, [f"{b.path}:{b.line}" for b in BLOCKS]
    assert {b.language for b in BLOCKS} <= set(RUNNERS), "a runnable block must be bash or python"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.path}:{b.line}" for b in BLOCKS])
def test_runnable_block(block: Block, tmp_path: Path):
    env = sandbox(tmp_path)
    script = tmp_path / f"block.{'py' if block.language == 'python' else 'sh'}"
    script.write_text(block.code + "\n")
    try:
        done = subprocess.run(
            [*RUNNERS[block.language], str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.path}:{block.line} ran past {BLOCK_TIMEOUT} s:\n{e.stdout}\n{e.stderr}")
    assert done.returncode == 0, (
        f"{block.path}:{block.line} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
        f"--- stderr\n{done.stderr[-4000:]}"
    )


def test_mkdocs_build_is_strict_and_clean(tmp_path: Path):
    """The site builds with no warning: a broken link, a missing anchor, a page left out of the nav, or a docstring
    mkdocstrings cannot read fails it. mkdocs comes with the `docs` extra, which scripts/test installs."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail('mkdocs is not installed: pip install -e ".[docs]" (scripts/test does)')
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").stat().st_size > 10_000  # the API reference was generated


def test_readme_is_one_page():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move the detail into docs/"


LINK = re.compile(r"\]\(([^)\s]+)\)|<img[^>]*\ssrc=\"([^\"]+)\"")


def test_readme_relative_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [a or b for a, b in LINK.findall(readme)]
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    assert relative, "the README links into docs/"
    missing = [t for t in relative if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
