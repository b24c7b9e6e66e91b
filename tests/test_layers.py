"""The package's import contract (pyproject.toml, [tool.importlinter]): layers that import one way, function-level
imports included, and no cycle anywhere. Checked by import-linter on the real source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LINT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_the_import_contract_holds():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


def test_a_function_level_import_up_the_layers_breaks_it(tmp_path):
    """The contract sees imports inside functions: the config layer reaching up to the samplers is refused, and
    reported as a cycle too."""
    shutil.copytree(REPO / "powersample", tmp_path / "powersample", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "powersample" / "config.py", "a") as f:
        f.write("\n\ndef _reach_up():\n    from powersample.samplers import registry  # noqa: F401\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert "powersample.config is not allowed to import powersample.samplers" in done.stdout
    assert "No cycles are allowed in powersample" in done.stdout
