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
    assert set(cli.COMMANDS) == {"train", "tune", "label", "export", "eval", "benchmark"}


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


@pytest.mark.parametrize("command", ["train", "tune", "label", "export", "eval", "benchmark"])
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


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_a_mistyped_override_is_one_line_naming_it_and_the_closest_field(capsys):
    assert cli.main(["train", "train.max_step=10"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _error_lines(captured.err) == [
        "error: override train.max_step=10: train.max_step is not a config field; did you mean train.max_steps?"
    ]


# A user error in each command: one `error:` line on stderr, nothing on stdout, exit code 1.
# Each is found before the command loads a model or starts Ray.
USER_ERRORS = {
    "train": (["lora.q=1"], "error: override lora.q=1: lora.q is not a config field; did you mean lora.r?"),
    "tune": (
        ["--config", "demo", "tune.num_sample=3"],
        "error: override tune.num_sample=3: tune.num_sample is not a config field; did you mean tune.num_samples?",
    ),
    "label": (["--input", "{tmp}/missing.csv", "--output", "{tmp}/out"], "error: "),
    "export": (["--adapter", "{tmp}/no-adapter", "--output", "{tmp}/merged"], "error: "),
    "eval": (["--predictions", "{tmp}/missing.parquet"], "error: no predictions at "),
    "benchmark": (["train", "--out", "{tmp}/bench", "--config", "{tmp}/missing.yaml"], "error: config file not found: "),
}


@pytest.mark.parametrize("command", sorted(USER_ERRORS))
def test_a_user_error_is_one_error_line_and_exit_1(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SENTIMENT_RAY_CACHE", str(tmp_path / "cache"))
    args, expected = USER_ERRORS[command]
    assert command in cli.COMMANDS
    code = cli.main([command, *(a.format(tmp=tmp_path) for a in args)])
    captured = capsys.readouterr()
    lines = _error_lines(captured.err)
    assert code == 1, captured.err
    assert captured.out == ""
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines[0]
    assert "full trace" not in lines[0], lines[0]


def test_a_fault_is_one_line_naming_its_trace_file(tmp_path, capsys, monkeypatch):
    """Anything that is not a user error: one line, the traceback in the cache's logs."""
    from sentiment_ray.terminal import runner

    monkeypatch.setenv("SENTIMENT_RAY_CACHE", str(tmp_path / "cache"))

    def job() -> dict:
        raise KeyError("boom")

    assert runner.run_job("eval", job) == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith("error: KeyError: 'boom' (full trace: ")
    log = Path(line.rsplit("(full trace: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "cache" / "logs" and log.name.startswith("eval-")
    assert "Traceback" in log.read_text()


def test_a_library_ending_the_process_inside_a_job_is_one_line(tmp_path, capsys, monkeypatch):
    """Ray ends its driver with SystemExit(1) when its local node goes away: the job still
    ends with one `error:` line naming the trace, and the exit code is kept."""
    from sentiment_ray.terminal import runner

    monkeypatch.setenv("SENTIMENT_RAY_CACHE", str(tmp_path / "cache"))

    def job() -> dict:
        raise SystemExit(1)

    assert runner.run_job("label", job) == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith("error: label was ended by a library (exit 1) before it finished (full trace: ")


def test_the_error_line_comes_out_when_stopping_and_reporting_fail(tmp_path, capsys, monkeypatch):
    from sentiment_ray.terminal import faults, runner

    monkeypatch.setenv("SENTIMENT_RAY_CACHE", str(tmp_path / "cache"))

    def broken_report(err, command):
        raise RuntimeError("cannot format")

    def closed():
        raise RuntimeError("ray.shutdown failed")

    monkeypatch.setattr(faults, "report", broken_report)

    def job() -> dict:
        raise KeyError("boom")

    assert runner.run_job("eval", job, runner.Ending(closed=closed)) == 1
    [line] = _error_lines(capsys.readouterr().err)
    assert line == "error: eval failed: KeyError (and its report failed: RuntimeError: cannot format)"


def test_a_finished_job_prints_its_summary_then_the_json_line_last(capsys):
    from sentiment_ray.terminal import runner

    ending = runner.Ending(finished=lambda summary: [f"report     {summary['report']}"])
    assert runner.run_job("eval", lambda: {"report": "out/eval-report.html"}, ending) == 0
    captured = capsys.readouterr()
    assert "report     out/eval-report.html" in captured.err
    assert captured.out.splitlines()[-1] == '{"report": "out/eval-report.html"}'


def test_printed_commands_are_runnable_from_where_the_user_stands(monkeypatch, tmp_path):
    """`make demo` runs `.venv/bin/python jobs/train.py` without activating the venv: the
    rerun and next commands name that interpreter, since a bare `python` lacks the packages;
    with the venv active they say `python`."""
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(venv_python))
    monkeypatch.setattr(sys, "argv", ["jobs/train.py", "train.max_steps=5"])

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv not active
    command = cli.CommandLine(cli.launcher(None, "train"), ["train.max_steps=5"])
    assert command.text() == ".venv/bin/python jobs/train.py train.max_steps=5"
    assert command.sibling("label") == ".venv/bin/python jobs/label.py"

    monkeypatch.setenv("PATH", f"{venv_python.parent}:/usr/bin:/bin")  # `source .venv/bin/activate`
    assert cli.launcher(None, "train") == "python jobs/train.py"
    assert cli.launcher("sentiment-ray train", "train") == "sentiment-ray train"
