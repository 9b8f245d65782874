"""The layers' import rules (.importlinter) hold, and the installed namespace is citytel alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None, "import-linter is a development dependency"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_the_repository_folders_are_the_citytel_subpackages() -> None:
    for folder in ("ingest", "processors", "config"):
        link = ROOT / "citytel" / folder
        assert link.is_symlink(), f"citytel/{folder} links to the top-level {folder}/"
        assert link.resolve() == (ROOT / folder).resolve()


def test_the_runtime_cli_works_without_the_development_tools(tmp_path: Path) -> None:
    """A runtime image leaves citytel.devtools out: the command must still start, without them."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _NoDevtools:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'citytel.devtools' or name.startswith('citytel.devtools.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NoDevtools())\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "citytel", "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "bridge" in result.stdout
    assert "bench" not in result.stdout
    assert "simulate" not in result.stdout


def test_no_module_imports_another_modules_private_names() -> None:
    """A leading underscore means "this module's own": another module reaching for it couples
    the two behind the interface's back (as the benchmarks once did)."""
    import ast

    reaching = []
    files = {
        path.resolve()
        for folder in ("citytel", "ingest", "processors", "config")
        for path in (ROOT / folder).rglob("*.py")
    }
    for path in sorted(files):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("citytel"):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                if private:
                    reaching.append(f"{path.relative_to(ROOT)}: from {node.module} import {', '.join(private)}")
    assert reaching == []
