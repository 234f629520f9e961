"""The README's tested commands, run as written: every ```bash block right after a
`<!-- tested -->` line.

They run in a copy of this checkout (tracked and untracked, not ignored files) whose demo
preset trains the tiny model (tests/conftest.py) for a few steps, so that the commands, typed
exactly as the README has them, take seconds instead of minutes; HOME is a temporary folder
(the Ray token, `~/sentiment-ray`). `.venv` in the copy points at this interpreter's
environment and PYTHONPATH at the copy, so `python` and `sentiment-ray` run the copy's code.

The cluster block's `ray start --head` line is the one line not run verbatim: the test starts
it with `--block` in a session of its own, with a private temp dir and free ports (also put in
place of the README's ports in the other lines), and ends that session only: other Ray
clusters on the machine are neither joined nor stopped (the machinery of test_ray_job_submit.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from test_ray_job_submit import _free_port, _stop_head

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
pytestmark = pytest.mark.slow


def _tested_blocks() -> list[str]:
    """The bash blocks marked `<!-- tested -->`, continuation lines joined."""
    blocks = re.findall(r"^<!-- tested -->\n```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
    return [block.replace("\\\n", " ") for block in blocks]


def _block(marker: str) -> str:
    found = [b for b in _tested_blocks() if marker in b]
    assert len(found) == 1, f"expected one tested README block with {marker!r}, found {len(found)}"
    return found[0]


def test_the_readme_marks_its_walkthrough_and_cluster_blocks():
    blocks = _tested_blocks()
    assert len(blocks) == 2
    assert any("jobs/label.py" in b and "label.write_submission=true" in b for b in blocks)
    assert any("ray start --head" in b and "RAY_AUTH_MODE=token" in b for b in blocks)


@pytest.fixture
def checkout(tmp_path, tiny_model_dir) -> Path:
    """A copy of the checkout whose demo preset trains the tiny model for 4 steps."""
    dest = tmp_path / "checkout"
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    preset = dest / "sentiment_ray" / "configs" / "demo.yaml"
    demo = yaml.safe_load(preset.read_text(encoding="utf-8"))
    demo["model"].update(name=tiny_model_dir, dtype="float32", max_seq_length=128)
    demo["lora"].update(r=4, alpha=8)
    demo["data"].update(max_train_rows=64, max_validation_rows=32)
    demo["train"].update(max_steps=4, save_steps=2, per_device_train_batch_size=4, eval_batch_size=16)
    demo["run"].update(cpus_per_worker=1)
    demo.setdefault("label", {}).update(batch_size=32)
    demo["tracking"] = {"mlflow": "false"}
    preset.write_text(yaml.safe_dump(demo), encoding="utf-8")
    return dest


def _env(checkout: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SENTIMENT_RAY_LOG", "RAY_AUTH_MODE", "VIRTUAL_ENV")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(checkout), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _bash(script: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, (
        f"README commands failed ({out.returncode}):\n{script}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-6000:]}"
    )
    return out


def test_walkthrough_runs_as_written(checkout, tmp_path):
    block = _block("jobs/export.py")
    (checkout / ".venv").symlink_to(sys.prefix)  # `. .venv/bin/activate`: this environment
    out = _bash(block, checkout, _env(checkout, tmp_path / "home"), timeout=1500)

    run = checkout / "runs" / "mine"
    # Training: the closing table and the next command on the terminal, the run's files.
    assert re.search(r"^all +32 +\d\.\d{3} +\d\.\d{3} +\d\.\d{3} +\d\.\d{3}$", out.stderr, re.M), out.stderr[-3000:]
    assert re.search(
        r"^next +python jobs/label\.py --input data/demo/sentiment_demo\.csv --output runs/mine-labels "
        r"--adapter runs/mine/adapter label\.write_submission=true$",
        out.stderr,
        re.M,
    )
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "metrics.json").is_file()
    assert list((run / "logs").glob("train-*.log"))
    # Labelling: every row in the submission, in input order, and a report naming what it is about.
    labels = checkout / "runs" / "mine-labels"
    submission = (labels / "submission.csv").read_text().splitlines()
    ids = [line.split(",", 1)[0] for line in (checkout / "runs" / "to-label.csv").read_text().splitlines()[1:]]
    assert submission[0] == "ID,label"
    assert [line.split(",")[0] for line in submission[1:]] == ids
    assert len(ids) == 400
    page = (labels / "report.html").read_text()
    for text in ('id="run-details"', "runs/mine/adapter", "to-label.csv", " UTC"):
        assert text in page, text
    # eval wrote its report beside the run's files; export a plain model whose files are all readable.
    assert (run / "eval-report.html").is_file()
    assert (run / "eval-metrics.json").is_file()
    merged = run / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "sentiment_ray_export.json"} <= {
        p.name for p in merged.iterdir()
    }
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in merged.iterdir()} == {0o666 & ~umask}
    # Each job ends its stdout with its JSON line.
    assert len([line for line in out.stdout.splitlines() if line.startswith("{") and line.endswith("}")]) == 4


def test_cluster_section_runs_as_written(checkout, tmp_path):
    block = _block("ray start --head")
    lines = [line for line in block.splitlines() if line.strip()]
    head_at = next(i for i, line in enumerate(lines) if line.startswith("ray start --head"))
    ports = {
        int(p): _free_port() for p in re.findall(r"--(?:port|dashboard-port|dashboard-agent-listen-port)=(\d+)", lines[head_at])
    }
    assert len(ports) == 3, lines[head_at]

    def private(line: str) -> str:
        return re.sub(r"(?<=[:=])(\d+)\b", lambda m: str(ports.get(int(m.group(1)), m.group(1))), line)

    home = tmp_path / "home"
    env = _env(checkout, home)
    _bash("\n".join(lines[:head_at]), checkout, env, timeout=120)
    temp_dir = tempfile.mkdtemp(prefix="rayrd-", dir="/tmp")  # short: Ray puts unix sockets here
    head_cmd = shlex.split(private(lines[head_at])) + [
        "--block",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--include-dashboard=true",
        "--node-ip-address=127.0.0.1",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
    ]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(head_cmd, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = _bash("\n".join(private(line) for line in lines[head_at + 1 :]), checkout, env, timeout=1500)
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert (home / ".ray" / "auth_token").is_file()
    # Relative outputs of the jobs went under ~/sentiment-ray, not into the jobs' temporary working dirs.
    run = home / "sentiment-ray" / "runs" / "on-cluster"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "metrics.json").is_file()
    submission = home / "sentiment-ray" / "runs" / "on-cluster-labels" / "submission.csv"
    assert submission.read_text().count("\n") == 4001  # the header and every row of the demo sample
    assert f"run on-cluster: {run}" in out.stdout + out.stderr
    results = [json.loads(line) for line in (out.stdout + out.stderr).splitlines() if line.startswith('{"')]
    assert results[0]["run_dir"] == str(run)
    assert results[1]["submission"] == str(submission)
