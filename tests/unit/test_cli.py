"""The `sentiment-ray` console command (sentiment_ray/cli.py): one subcommand per job, the
same parsers and main functions as jobs/*.py, every option documented in --help."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from sentiment_ray import cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _help_text(command: list[str]) -> str:
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_console_script_is_declared_in_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["sentiment-ray"] == "sentiment_ray.cli:main"
    assert set(cli.COMMANDS) == {"train", "tune", "label", "export", "eval"}


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_option_has_help_and_appears_in_help_output(command):
    parser = cli.COMMANDS[command].parser(f"sentiment-ray {command}")
    options = _options(parser)
    assert options
    for action in options:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
        assert action.help.strip(), f"{command}: {action.option_strings or action.dest} has no help"
    launchers = [[sys.executable, "-m", "sentiment_ray.cli"]]
    installed = shutil.which("sentiment-ray", path=os.path.dirname(sys.executable))
    if installed:  # `pip install -e .` puts the console script next to the interpreter
        launchers.append([installed])
    for launcher in launchers:
        text = " ".join(_help_text(launcher + [command, "--help"]).split())
        assert f"sentiment-ray {command}" in text
        for action in options:
            names = action.option_strings or [action.dest]
            for name in names:
                assert name in text, f"`{' '.join(launcher)} {command} --help` does not list {name}"
            # argparse wraps lines, also at hyphens: compare without whitespace
            expected = "".join(action.help.replace("%(default)s", str(action.default)).split())
            assert expected in "".join(text.split()), f"{command} --help lacks the help of {names[0]}"


@pytest.mark.parametrize("command", ["train", "tune", "label", "export", "eval"])
def test_job_scripts_use_the_same_parser_and_main(command):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"jobs_{command}", REPO_ROOT / "jobs" / f"{command}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main is cli.COMMANDS[command].main
    assert job.parser is cli.COMMANDS[command].parser
    text = " ".join(_help_text([sys.executable, f"jobs/{command}.py", "--help"]).split())
    for action in _options(cli.COMMANDS[command].parser(None)):
        for name in action.option_strings or [action.dest]:
            assert name in text


def test_top_level_help_and_unknown_command():
    text = _help_text([sys.executable, "-m", "sentiment_ray.cli", "--help"])
    for command in cli.COMMANDS:
        assert command in text
    out = subprocess.run([sys.executable, "-m", "sentiment_ray.cli", "fly"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_bad_config_exits_2_naming_the_field(capsys):
    assert cli.main(["train", "lora.q=1"]) == 2
    assert "lora.q" in capsys.readouterr().err
