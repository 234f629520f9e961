"""The terminal pieces without Ray: worker events, the progress lines, the closing table, the
one-line / one-paragraph failure texts, the next command, durable paths under `ray job submit`."""

from __future__ import annotations

import io
import logging

import pytest

from sentiment_ray import cluster
from sentiment_ray.config import load_config
from sentiment_ray.io.values import DataError
from sentiment_ray.terminal import console
from sentiment_ray.terminal import training as terminal


def test_events_survive_rays_prefix_and_colours(capsys):
    events = console.WorkerEvents(True, min_step_interval_s=0)
    events.phase("zero-shot scoring 200 validation rows")
    events.step(3, 60, 0.5)
    printed = capsys.readouterr().out.splitlines()
    assert [console.parse_event(line) for line in printed] == [
        {"kind": "phase", "text": "zero-shot scoring 200 validation rows"},
        {"kind": "step", "step": 3, "total": 60, "loss": 0.5},
    ]
    coloured = f"\x1b[36m(RayTrainWorker pid=1)\x1b[0m {printed[0]}"
    assert console.parse_event(coloured)["text"].startswith("zero-shot")
    assert console.parse_event("an ordinary line") is None
    console.WorkerEvents(False).phase("not printed")
    assert capsys.readouterr().out == ""


def test_worker_events_throttle_steps_but_never_the_last():
    events = console.WorkerEvents(True, min_step_interval_s=3600)
    sent = []
    events.emit = lambda kind, **fields: sent.append(fields.get("step"))
    for step in range(1, 11):
        events.step(step, 10)
    assert sent == [1, 10]


def test_the_first_step_is_sent_on_a_machine_booted_seconds_ago(monkeypatch):
    """time.monotonic() counts from boot: right after one, it is smaller than the interval."""
    monkeypatch.setattr(console.time, "monotonic", lambda: 0.25)
    events = console.WorkerEvents(True, min_step_interval_s=3600)
    sent = []
    events.emit = lambda kind, **fields: sent.append(fields.get("step"))
    events.step(1, 10)
    events.step(2, 10)
    assert sent == [1]


def test_line_mode_progress_prints_every_tenth_with_loss_eta_and_checkpoint():
    out = io.StringIO()
    display = console.Display(out, tty=False)
    display.handle_event({"kind": "phase", "text": "training 60 steps"})
    display.handle_event({"kind": "progress_start", "total": 60, "initial": 0})
    for step in range(1, 61):
        if step == 15:
            display.handle_event({"kind": "checkpoint", "step": 15})
        display.handle_event({"kind": "step", "step": step, "total": 60, "loss": 1.0 / step})
    lines = out.getvalue().splitlines()
    assert lines[0] == "training 60 steps"
    steps = [line.split()[1] for line in lines[1:]]
    assert steps == [f"{k}/60" for k in range(6, 61, 6)]
    assert "checkpoint 15" in lines[3]
    assert "ETA" in lines[3]
    assert "loss 0.0556" in lines[3]
    assert "checkpoint" not in lines[2]
    assert "took" in lines[-1]
    assert display.last_step == (60, 60)


def test_package_warnings_reach_the_terminal_and_the_rest_waits_for_the_log(tmp_path):
    out = io.StringIO()
    log = console.RunLog(verbose=False, display=console.Display(out, tty=False))
    log.start()
    try:
        logging.getLogger("sentiment_ray.train.data").warning("7 of 64 training sentences were cut")
        logging.getLogger("sentiment_ray.train.data").info("not on the terminal")
        logging.getLogger("some.library").warning("library noise")
        log.open(str(tmp_path / "logs" / "train.log"))
        log.write_text("(RayTrainWorker pid=1) a worker line")
    finally:
        log.close()
    assert out.getvalue() == "warning: 7 of 64 training sentences were cut\n"
    written = (tmp_path / "logs" / "train.log").read_text()
    for text in ("7 of 64", "not on the terminal", "library noise", "a worker line"):
        assert text in written


METRICS = {
    "zero_shot": {
        "n": 200,
        "accuracy": 0.375,
        "macro_f1": 0.2727,
        "ece": 0.2104,
        "per_language": {
            "en": {"n": 120, "accuracy": 0.4, "macro_f1": 0.3},
            "de": {"n": 80, "accuracy": 0.3375, "macro_f1": 0.25},
        },
    },
    "fine_tuned": {
        "n": 200,
        "accuracy": 0.73,
        "macro_f1": 0.6721,
        "ece": 0.0452,
        "per_language": {"en": {"n": 120, "accuracy": 0.75, "macro_f1": 0.7}, "de": {"n": 80, "accuracy": 0.7, "macro_f1": 0.63}},
    },
}


def test_summary_table_sets_zero_shot_against_fine_tuned_per_language_with_ece():
    table = terminal.summary_table(METRICS)
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert rows["all"] == ["200", "0.375", "0.273", "0.730", "0.672"]
    assert rows["en"] == ["120", "0.400", "0.300", "0.750", "0.700"]
    assert rows["de"] == ["80", "0.338", "0.250", "0.700", "0.630"]
    assert rows["ECE"] == ["0.210", "0.045", "the", "model's", "own"]
    assert [line.split()[0] for line in table[2:]] == ["all", "en", "de", "ECE"]  # languages by size
    # Calibrated: the model's own ECE (metrics.json fine_tuned.ece, the calibration's ece_before),
    # then the out-of-fold ECE of the temperature-scaled probabilities (fine_tuned.ece_calibrated).
    calibration = {"applied": True, "temperature": 1.445, "ece_before": 0.0706, "ece_after": 0.0213}
    fine_tuned = {**METRICS["fine_tuned"], "ece": 0.0706, "ece_calibrated": 0.0213}
    calibrated = terminal.summary_table({**METRICS, "fine_tuned": fine_tuned, "calibration": calibration})
    assert calibrated[-2].split() == ["ECE", "0.210", "0.071", "the", "model's", "own"]
    assert calibrated[-1].split() == ["calibrated", "0.021", "temperature", "1.45,", "out", "of", "fold"]
    kept = terminal.summary_table(
        {
            **METRICS,
            "fine_tuned": fine_tuned,
            "calibration": {**calibration, "applied": False, "temperature": 1.0, "ece_after": 0.0706},
        }
    )
    assert kept[-1].split()[:3] == ["calibrated", "–", "not"]
    assert terminal.summary_table({"zero_shot": None, "fine_tuned": None}) == ["no validation rows: nothing was scored"]


def test_summary_table_marks_a_language_made_worse_and_one_lower_within_noise():
    languages = [{"lang": "en", "verdict": "not worse"}, {"lang": "de", "verdict": "worse"}]
    table = terminal.summary_table({**METRICS, "languages": languages})
    marks = {line.split()[0]: line.split()[6:] for line in table[3:5]}
    assert marks == {"en": [], "de": ["worse"]}
    noisy = terminal.summary_table({**METRICS, "languages": [{"lang": "de", "verdict": "lower, within noise"}]})
    assert noisy[4].endswith("0.630  lower, within noise")


class _FakeWorkerGroupError(Exception):
    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_failures_are_one_line_or_one_paragraph(tmp_path):
    command = terminal.CommandLine("python jobs/train.py", ["data.train_path=x.csv"])
    code, text, _ = terminal.explain(
        DataError("x.csv: missing column(s) ['sentence']"), run_dir=None, command=command, log_path=None
    )
    assert (code, text) == (1, "error: x.csv: missing column(s) ['sentence']")

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-000015").mkdir(parents=True)
    (run_dir / "checkpoint-000015" / "trainer_state.json").write_text("{}")
    (run_dir / "checkpoint-000030").mkdir()  # incomplete: no trainer_state.json
    raised = _FakeWorkerGroupError({0: RuntimeError("CUDA error: out of memory")})
    code, text, _ = terminal.explain(raised, run_dir=str(run_dir), command=command, log_path="runs/x/logs/train.log")
    assert code == 1
    assert "\n" not in text
    assert text.startswith(
        "error: the training worker raised RuntimeError: CUDA error: out of memory (traceback: runs/x/logs/train.log)"
    )
    assert "the last checkpoint is step 15" in text
    assert "resumes from it" in text

    code, text, _ = terminal.explain(KeyboardInterrupt(), run_dir=str(run_dir), command=command, log_path=None)
    assert code == 130
    assert "step 15" in text
    assert text.endswith("python jobs/train.py data.train_path=x.csv")


def test_the_checkpoint_a_rerun_resumes_from_is_the_one_ray_train_registered(tmp_path):
    for step in (10, 15):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
        (tmp_path / f"checkpoint-{step:06d}" / "trainer_state.json").write_text("{}")
    assert terminal.last_checkpoint(str(tmp_path)) == (15, str(tmp_path / "checkpoint-000015"))
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(
        '{"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint-000010", "metrics": {}}}'
    )
    assert terminal.last_checkpoint(str(tmp_path)) == (10, str(tmp_path / "checkpoint-000010"))
    assert terminal.last_checkpoint(str(tmp_path / "absent")) is None


def test_next_command_labels_with_the_adapter_the_same_way(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo", ["model.name=/models/x", "train.max_steps=5"])
    cmd = terminal.CommandLine(
        "python jobs/train.py",
        ["model.name=/models/x", "train.max_steps=5"],
        "demo",
        ["model.name=/models/x", "train.max_steps=5"],
    )
    shown = terminal.TrainTerminal(cmd, display=console.Display(io.StringIO(), tty=False))
    try:
        shown.cfg = cfg
        text = shown.next_command(
            {"run_dir": str(tmp_path / "runs" / "demo"), "adapter": str(tmp_path / "runs" / "demo" / "adapter")}
        )
    finally:
        shown.log.close()
    assert text.startswith("python jobs/label.py --input ")
    assert text.endswith("--output runs/demo-labels --adapter runs/demo/adapter model.name=/models/x label.write_submission=true")
    assert "train.max_steps" not in text
    assert terminal.CommandLine("sentiment-ray train").sibling("label") == "sentiment-ray label"


def test_relative_outputs_inside_a_ray_job_go_under_the_durable_home(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert cluster.durable_path("runs") == "runs"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv(cluster.JOB_HOME_ENV, str(tmp_path / "home"))
    assert cluster.durable_path("runs") == str(tmp_path / "home" / "runs")
    assert cluster.durable_path("/abs/runs") == "/abs/runs"
    assert cluster.durable_path("s3://b/runs") == "s3://b/runs"
    (tmp_path / "home" / "runs" / "demo" / "adapter").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert cluster.durable_input_path("runs/demo/adapter") == str(tmp_path / "home" / "runs" / "demo" / "adapter")
    assert cluster.durable_input_path("data/missing.csv") == "data/missing.csv"
    monkeypatch.delenv(cluster.JOB_HOME_ENV)
    assert cluster.job_home().endswith("/sentiment-ray")


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (65, "1m05s"), (3725, "1h02m"), (None, "?")])
def test_durations(seconds, text):
    assert console.format_duration(seconds) == text


def test_summary_table_ends_with_the_shares_of_rows_accepted_at_each_certified_error():
    certified = [
        {"max_error": 0.01, "threshold": None, "coverage": 0.0},
        {"max_error": 0.05, "threshold": 0.99, "coverage": 0.62},
        {"max_error": 0.1, "threshold": 0.9, "coverage": 0.85},
    ]
    table = terminal.summary_table({**METRICS, "risk_control": {"delta": 0.05, "certified": certified}})
    assert table[-1] == (
        "accepted with a guaranteed error (validation, failure probability 0.05): "
        "error <= 0.05: 62% of rows, error <= 0.1: 85% of rows"
    )
    nothing = [{**c, "threshold": None} for c in certified]
    assert not terminal.summary_table({**METRICS, "risk_control": {"delta": 0.05, "certified": nothing}})[-1].startswith(
        "accepted"
    )


def test_the_label_job_draws_its_rows_with_the_training_bar_on_a_terminal():
    from sentiment_ray.label.progress import ProgressView, Snapshot

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    view = ProgressView(board=None, total_rows=4000, done_before=1000, stream=screen)
    view._draw_bar(Snapshot(done=2500, total=4000, bad=3, rate=750.0, eta_s=2.0), final=False)
    view._draw_bar(Snapshot(done=4000, total=4000, bad=5, rate=800.0, eta_s=0.0), final=True)
    drawn = screen.getvalue()
    assert "row 1000/4000 |" in drawn  # the rows labelled before a resume count from the start
    assert "row 4000/4000 |##########|" in drawn
    assert "bad rows 5" in drawn
    assert "row/s" in drawn  # a rate in rows per second, not seconds per row
    assert view.display._bar is None  # closed: the summary lines come after it
