"""jobs/benchmark.py and sentiment_ray.bench: FLOPs conventions, shapes, token counting,
the parent's comparisons, and the CPU smoke runs of both modes (the CI check of the
benchmark: tiny model, hf backend only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sentiment_ray.bench import flops, shapes, train_bench
from sentiment_ray.bench.label_bench import format_label_table, padded_tokens
from sentiment_ray.config import ALL_PROJECTIONS

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "benchmark.py"
DEMO_CSV = str(REPO / "data" / "demo" / "sentiment_demo.csv")  # small: the smoke runs read it fast
LLAMA8B = flops.ModelShape.from_config(shapes.SHAPES["llama8b-shape"])


# ----------------------------------------------------------------------------- FLOPs (pure)


def test_llama8b_shape_has_the_real_parameter_count():
    s = LLAMA8B
    embedding = s.hidden_size * s.vocab_size
    norms = (2 * s.num_hidden_layers + 1) * s.hidden_size
    # Meta-Llama-3.1-8B has 8,030,261,248 parameters.
    assert s.matmul_params() + embedding + norms == 8_030_261_248
    assert s.matmul_params() == 7_504_658_432  # N of the 4N convention: projections + LM head
    assert s.lora_params(16, ALL_PROJECTIONS) == 41_943_040  # Unsloth prints this for r=16


def test_matmul_params_match_a_real_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops.ModelShape.from_config(model.config).matmul_params() == linear


def test_attention_counts_causal_pairs_per_document():
    assert flops.causal_pairs([3]) == 6
    assert flops.causal_pairs([3, 4]) == 6 + 10
    assert flops.doc_lengths_from_position_ids([0, 1, 2, 0, 1, 2, 3]) == [3, 4]
    one_layer = flops.ModelShape(8, 16, 1, 2, 1, 4, 10)  # d_attn = 8
    # QK^T + AV, 2 FLOPs per multiply-add, 6 pairs, width 8.
    assert flops.attention_forward_flops(one_layer, 6) == 2 * 2 * 8 * 6
    # Packing two documents costs less attention than one document of the same tokens.
    assert flops.causal_pairs([1024, 1024]) < flops.causal_pairs([2048])


def test_train_and_scoring_flops_follow_the_stated_conventions():
    s = LLAMA8B
    t = flops.train_flops(s, tokens=1000, pairs=0, lora_params=0)
    assert t["model_flops"] == 4 * s.matmul_params() * 1000
    assert t["hardware_flops"] == t["model_flops"] + 2 * (s.matmul_params() - s.lm_head_params()) * 1000
    with_attn = flops.train_flops(s, tokens=1000, pairs=500, lora_params=10)
    attn = flops.attention_forward_flops(s, 500)
    assert with_attn["model_flops"] == t["model_flops"] + 6 * 10 * 1000 + 3 * attn
    # Scoring: LM head only at the last position of each prompt.
    sc = flops.scoring_flops(s, [10, 20])
    body = s.matmul_params() - s.lm_head_params()
    assert sc["model_flops"] == 2 * body * 30 + 2 * s.lm_head_params() * 2 + flops.attention_forward_flops(s, 55 + 210)
    assert flops.mfu(989e12, 1.0) == pytest.approx(1.0)
    assert flops.mfu(1.0, 0.0) is None


def test_token_counter_counts_real_tokens_and_pairs_without_host_sync():
    import torch

    counter = train_bench._token_counter_class()()
    # Padding-free packed row: documents of 3 and 4 tokens.
    counter.count(
        {
            "input_ids": torch.ones(1, 7, dtype=torch.long),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
            "labels": torch.tensor([[-100, -100, 5, -100, -100, 6, 7]]),
        }
    )
    # Right-padded batch with an attention mask: rows of 3 and 1 real tokens.
    counter.count({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])})
    got = counter.pop()
    assert got == {"tokens": 7 + 4, "pairs": 16 + 6 + 1, "label_tokens": 3, "positions": 7 + 8, "micro_batches": 2}
    assert counter.pop()["tokens"] == 0  # pop resets


def test_padded_tokens_follow_the_scorers_longest_first_batches():
    assert padded_tokens([5, 1, 3, 2], 2) == 2 * 5 + 2 * 2
    assert padded_tokens([5, 1, 3, 2], 4) == 4 * 5


# ----------------------------------------------------------------------------- parent logic


def _fake_run(tps, step, alloc, resv, losses):
    return {
        "tokens_per_s": tps,
        "step_time_s": {"mean": step},
        "peak_memory_allocated_gib": alloc,
        "peak_memory_reserved_gib": resv,
        "mfu": tps / 1e5,
        "losses": losses,
        "loss_last": losses[-1],
        "warmup_time_s": 1.0,
        "setup": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "max_length": 2048, "packing": True},
    }


def test_comparison_ratios_loss_agreement_and_targets():
    runs = {"unsloth": _fake_run(8000, 2.0, 6.0, 7.0, [11.9, 11.8]), "hf": _fake_run(2500, 6.4, 17.5, 19.0, [11.9, 11.81])}
    comp = train_bench.compare_runs(runs, ["trainer"])["unsloth/hf"]
    assert comp["ratios"]["tokens_per_s"] == pytest.approx(3.2)
    assert comp["ratios"]["peak_memory_allocated"] == pytest.approx(6.0 / 17.5)
    assert comp["loss_agreement"]["agree"]
    assert comp["loss_agreement"]["last_abs_diff"] == pytest.approx(0.01)
    targets = train_bench.check_targets(runs["unsloth"], runs["hf"])
    assert all(t["pass"] for t in targets.values())
    slow = _fake_run(7000, 2.0, 7.0, 10.0, [11.9, 9.0])
    targets = train_bench.check_targets(slow, runs["hf"])
    assert [targets[k]["pass"] for k in ("unsloth_tokens_per_s", "speedup_vs_hf", "memory_ratio_vs_hf")] == [False, False, True]
    assert not train_bench.compare_runs({"unsloth": slow, "hf": runs["hf"]}, ["trainer"])["unsloth/hf"]["loss_agreement"]["agree"]
    # A failed run gives no comparison, and the table says FAILED instead of crashing.
    failed = {"unsloth": {"error": "boom"}, "hf": runs["hf"]}
    assert train_bench.compare_runs(failed, ["trainer"]) == {}
    table = train_bench.format_train_table(
        {
            "model": "llama8b-shape",
            "warmup_steps": 3,
            "timed_steps": 8,
            "peak_tflops": 989.0,
            "runs": failed,
            "comparisons": {},
            "targets": train_bench.check_targets(None, runs["hf"]),
        }
    )
    assert "FAILED" in table
    assert "targets:" in table


# ----------------------------------------------------------------------------- shapes


def test_tiny_shape_builds_once_with_full_vocab_and_small_tokenizer(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(shapes.prepare_model("tiny-shape", tokenizer=tiny_model_dir, cache_root=tmp_path, device="cpu"))
    marker = json.loads((path / shapes.SHAPE_MARKER).read_text())
    assert marker["shape"] == "tiny-shape"
    assert marker["tokenizer_vocab"] < 128256
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert model.lm_head.weight.shape[0] == 128256
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert model.config.eos_token_id == tok.eos_token_id
    assert tok.pad_token is not None
    logits = model(**tok("a test sentence", return_tensors="pt")).logits
    assert logits.shape[-1] == 128256
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert shapes.prepare_model("tiny-shape", tokenizer=tiny_model_dir, cache_root=tmp_path) == str(path)
    assert weights.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_bench_modules_import_nothing_heavy():
    heavy = ["torch", "transformers", "unsloth", "ray", "peft", "trl"]
    code = (
        "import sys; import sentiment_ray.bench.flops, sentiment_ray.bench.shapes, sentiment_ray.bench.common, "
        "sentiment_ray.bench.train_bench, sentiment_ray.bench.label_bench; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


# ----------------------------------------------------------------------------- smoke runs (CI)


def _run_job(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(JOB), *args, "--data", DEMO_CSV], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


@pytest.mark.slow
def test_train_smoke_writes_the_fields_with_a_finite_loss(tiny_model_dir, tmp_path):
    proc = _run_job("train", "--model", tiny_model_dir, "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train benchmark" in proc.stdout
    assert "full results" in proc.stdout
    result = json.loads((tmp_path / "train_benchmark.json").read_text())
    assert list(result["runs"]) == ["hf"]  # smoke: the hf half only
    assert result["data"] == DEMO_CSV
    assert result["warmup_steps"] == 1
    assert result["timed_steps"] == 2
    run = result["runs"]["hf"]
    assert "error" not in run
    assert run["backend"] == "hf"
    assert run["loop"] == "trainer"
    assert len(run["steps"]) == 3
    assert len(run["losses"]) == 3
    assert run["loss_finite"]
    assert all(math.isfinite(x) for x in run["losses"])
    assert math.isfinite(run["loss_last"])
    assert run["loss_last"] == run["losses"][-1]
    assert run["tokens_per_s"] > 0
    assert run["step_time_s"]["mean"] > 0
    assert 0 < run["real_tokens_timed"] <= run["positions_timed"]
    assert run["real_tokens_timed"] == sum(s["tokens"] for s in run["steps"][1:])
    # Packed to max_length: every micro-batch holds at most batch x max_length real tokens.
    setup = run["setup"]
    assert setup["packing"]
    assert setup["max_length"] == 256
    per_step_cap = setup["per_device_train_batch_size"] * setup["gradient_accumulation_steps"] * setup["max_length"]
    assert all(0 < s["tokens"] <= per_step_cap for s in run["steps"])
    assert all(s["micro_batches"] == setup["gradient_accumulation_steps"] for s in run["steps"])
    for key in ("peak_memory_allocated_gib", "peak_memory_reserved_gib", "mfu", "hfu", "achieved_tflops", "flops", "environment"):
        assert key in run
    assert run["peak_memory_allocated_gib"] is None  # CPU
    assert run["mfu"] > 0
    assert run["flops"]["convention"] == flops.TRAIN_CONVENTION
    # The LoRA params the FLOPs count are the model's actual trainable ones.
    assert run["parameters"]["trainable"] == flops.ModelShape(**run["shape"]).lora_params(16, ALL_PROJECTIONS)
    assert result["comparisons"] == {}  # one backend: nothing to compare
    # What a comparison of two backends needs: per-step gradient norms and learning rates,
    # fingerprints of the first batches, the dtypes trained and frozen.
    assert len(run["grad_norms"]) == 3
    assert all(math.isfinite(x) for x in run["grad_norms"])
    assert max(run["learning_rates"]) > 0
    assert len(run["batch_fingerprints"]) == 3
    assert len(set(run["batch_fingerprints"])) == 3
    assert run["numerics"]["trained_dtypes"] == {"float32": run["parameters"]["trainable"]}
    assert run["numerics"]["padding_side"] in ("left", "right")


@pytest.mark.slow
def test_train_bare_loop_measures_in_process(tiny_model_dir):
    """The bare-loop variant (no Trainer loop) over the same data and optimizer."""
    from sentiment_ray.bench import common

    cfg = common.base_config(common.DEFAULT_CONFIG, train_bench.SMOKE_OVERRIDES)
    spec = {
        "config": train_bench.child_config(cfg, tiny_model_dir, "hf", 1, 1, DEMO_CSV),
        "model_label": "tiny",
        "warmup_steps": 1,
        "timed_steps": 1,
        "loop": "bare",
        "max_rows": 64,
        "peak_tflops": 989.0,
    }
    run = train_bench.measure(spec)
    assert run["loop"] == "bare"
    assert len(run["steps"]) == 2
    assert run["loss_finite"]
    assert run["setup"]["train_rows"] == 64
    assert run["real_tokens_timed"] > 0


@pytest.mark.slow
def test_label_smoke_writes_every_phase(tiny_model_dir, tmp_path):
    """With a random adapter of the preset's LoRA shape and the whole labelling job on 30 rows."""
    proc = _run_job(
        "label",
        "--model",
        tiny_model_dir,
        "--smoke",
        "--out",
        str(tmp_path),
        "--adapter",
        "random",
        "--pipeline-rows",
        "30",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "label benchmark" in proc.stdout
    result = json.loads((tmp_path / "label_benchmark.json").read_text())
    run = result["runs"]["hf"]
    assert "error" not in run
    assert run["n_examples"] == 24
    assert run["prompt_tokens"] > 0
    assert run["tokenisation"]["examples_per_s"] > 0
    assert [p["batch_size"] for p in run["scoring"]] == [
        "4 rows",
        "8 rows",
        "<=256 tok",
        "<=256 tok, <=64 rows",
        "<=256 tok +prefix",
    ]
    assert [p["max_batch_tokens"] for p in run["scoring"]] == [0, 0, 256, 256, 256]
    for p in run["scoring"]:
        assert p["examples_per_s"] > 0
        assert p["prompt_tokens_per_s"] > 0
        assert p["finite"]
        assert p["computed_tokens_per_s"] <= p["prompt_tokens_per_s"] * 1.01
        assert 0 < p["tokenisation_share"] < 1
        assert p["mfu"] > 0
        assert 0 <= p["padding_fraction"] < 1
    assert [p["batch_size"] for p in run["generate_batched"]] == [4, 8]
    assert all(p["n"] == 8 and p["examples_per_s"] > 0 and 0 <= p["parse_failed"] <= 8 for p in run["generate_batched"])
    per_row = run["generate_per_row"]
    assert per_row["n"] == 4
    assert per_row["examples_per_s"] > 0
    assert 0 < per_row["new_tokens"] <= 4 * 2
    assert "per-row gen" in format_label_table(result)
    assert result["adapter"].endswith("random-adapter")
    # Held as the label job holds it: on a CPU merged into the weights, so no LoRA layer is left.
    assert run["adapter_form"]["form"] == "merged"
    assert run["lora_params"] == 0
    pipeline = run["pipeline"]
    assert "error" not in pipeline, pipeline
    assert pipeline["rows"] == pipeline["labelled"] == 30
    assert pipeline["prompt_tokens_per_s_in_window"] > 0
    assert pipeline["actor_startup_s_max"] > 0
    assert 0 < pipeline["job_over_window"] <= 1.01
    assert "whole job (jobs/label.py): 30 rows" in proc.stdout


@pytest.mark.slow
def test_a_failing_backend_is_reported_not_hidden(tiny_model_dir, tmp_path):
    """unsloth on a CPU machine: the child fails, the JSON says why, the job exits 1."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine where the unsloth backend cannot run")
    proc = _run_job("train", "--model", tiny_model_dir, "--smoke", "--backends", "unsloth", "--out", str(tmp_path))
    assert proc.returncode == 1
    run = json.loads((tmp_path / "train_benchmark.json").read_text())["runs"]["unsloth"]
    assert "BackendError" in run["error"]
    assert run["child"]["returncode"] == 1
    assert "FAILED" in proc.stdout


@pytest.mark.slow
def test_label_forms_compare_the_adapter_held_each_way_on_one_load(tiny_model_dir, tmp_path):
    """`--forms`: no adapter, peft's layers and the merged adapter side by side; the merged
    form gives peft's labels and probabilities (float32 on a CPU)."""
    from sentiment_ray.bench import common, shapes
    from sentiment_ray.bench.label_bench import SMOKE_OVERRIDES, format_forms_table, measure

    cfg = common.base_config(common.DEFAULT_CONFIG, SMOKE_OVERRIDES + ["model.backend=hf"])
    cfg.model.name = tiny_model_dir
    adapter = shapes.write_random_adapter(tiny_model_dir, str(tmp_path / "adapter"), cfg.lora, seed=0)
    spec = {
        "config": cfg.model_dump(mode="json"),
        "model_label": "tiny",
        "adapter": adapter,
        "data": str(DEMO_CSV),
        "n": 24,
        "token_budgets": [256],
        "peak_tflops": 989.0,
        "forms": ["none", "unmerged", "fused", "merged"],
    }
    run = measure(spec)
    forms = run["forms"]
    assert list(forms) == ["none", "unmerged", "merged"]  # the hf backend has no fused form
    for name, form in forms.items():
        assert "error" not in form, (name, form)
        assert [(x["max_batch_tokens"], x["reuse_prefix"]) for x in form["runs"]] == [(256, False), (256, True)]
        assert all(x["prompt_tokens_per_s"] > 0 and x["mfu"] > 0 for x in form["runs"])
    merged = forms["merged"]["runs"]
    assert all(x["same_label_share"] == 1.0 for x in merged)
    assert max(x["max_prob_difference"] for x in merged) < 1e-4
    assert max(x["max_prob_difference"] for x in forms["none"]["runs"]) > 1e-3  # the adapter matters
    table = format_forms_table({"runs": {"hf": run}})
    assert "merged" in table
    assert "x no adapter" in table
