"""The device scripts parse: a syntax error in ``scripts/`` costs a GPU start (minutes of the session's
device time) before it shows, so it must show here. Bash scripts through ``bash -n``, Python scripts
through ``compile`` (neither runs anything)."""

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.sh")), ids=lambda p: p.name)
def test_bash_script_parses(path):
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.py")), ids=lambda p: p.name)
def test_python_script_compiles(path):
    compile(path.read_text(), str(path), "exec")


def test_there_are_scripts_to_check():
    assert len(list(SCRIPTS.glob("*.sh"))) >= 10 and len(list(SCRIPTS.glob("*.py"))) >= 5
