"""Every ``bevdeploy ...`` command the README's shell blocks and ``bevdeploy --help`` show parses with today's
flags (a renamed or dropped flag would leave the documentation telling users to run what fails)."""

import re
import shlex
from pathlib import Path

import pytest

from bevdeploy.cli import EPILOG, build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    # the --help examples: the command, then two or more spaces and what it does
    lines += [re.split(r"\s{2,}", line.strip())[0] for line in EPILOG.splitlines()]
    return [line for line in lines if line.startswith("bevdeploy ")]


def test_the_readme_shows_commands_of_every_kind():
    verbs = {shlex.split(c, comments=True)[1] for c in _commands()}
    assert {"demo", "eval", "build", "bench", "train", "show", "report", "export"} <= verbs


@pytest.mark.parametrize("command", _commands())
def test_documented_command_parses(command):
    args = build_parser().parse_args(shlex.split(command, comments=True)[1:])
    assert callable(args.func)
