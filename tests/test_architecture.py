"""The layout's rules hold: import-linter's contracts (pyproject `[tool.importlinter]`).

The core (`bridge`) never imports the facade (`http_api`) or the composition root
(`batmon`); the facade never imports the store or SQLite; SQLite only in the store.
The second test proves the check can fail: a copy of the tree with one violating
import is refused, naming the contract it breaks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("bridge", "http_api", "batmon")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the tree in cwd, not the installed one
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=120)  # fmt: skip


def copy_tree(to: Path) -> None:
    """The packages' Python files and pyproject.toml: all lint-imports reads."""

    def not_python(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__"
                or (not n.endswith(".py") and not (Path(folder) / n).is_dir())]  # fmt: skip

    for package in PACKAGES:
        shutil.copytree(ROOT / package, to / package, ignore=not_python)
    shutil.copy(ROOT / "pyproject.toml", to / "pyproject.toml")


def test_the_tree_keeps_every_import_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("http_api/handlers.py", "import sqlite3", "The facade never imports the store or SQLite"),
    ("http_api/app.py", "from bridge.store import db", "The facade never imports the store or SQLite"),
    ("bridge/core.py", "import http_api.app", "The core never imports the facade or the composition root"),
    ("bridge/extensions/watchdog.py", "import batmon.service",
     "The core never imports the facade or the composition root"),
    ("bridge/writer.py", "import sqlite3", "SQLite only in the store"),
    ("batmon/cli.py", "import sqlite_utils", "SQLite only in the store"),
])  # fmt: skip
def test_a_violating_import_fails_naming_its_contract(tmp_path: Path, module: str, line: str,
                                                       contract: str) -> None:  # fmt: skip
    copy_tree(tmp_path)
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{contract} BROKEN" in result.stdout, result.stdout
