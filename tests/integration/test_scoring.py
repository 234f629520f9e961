"""Label-token scoring on the tiny random Llama (CPU, seconds) and one check on the real
demo model."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from tiny_model import DEMO_CSV

from sentiment_ray.config import PromptConfig
from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate

TEMPLATE = PromptTemplate.from_config(PromptConfig())
LABELS = LabelSet(["Positive", "Negative"])
SENTENCES = [
    "I love this phone, the battery lasts forever",
    "terrible service, never again",
    "ok",
    "El servicio fue excelente y la comida deliciosa",
    "这个产品很差劲",
    "Filmnya bagus sekali",
    "meh",
    "The plot was thin but the acting carried it through to a satisfying ending",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer) from the tiny folder, eval mode, float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def make_scorer(tiny, max_length=128, batch_size=4, labels=LABELS):
    from sentiment_ray.scoring import LabelScorer

    model, tokenizer = tiny
    return LabelScorer(model, tokenizer, TEMPLATE, labels, max_length=max_length, batch_size=batch_size)


def test_import_does_not_pull_torch():
    code = "import sys, sentiment_ray.scoring, sentiment_ray.backends; print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'unsloth', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_probs_are_distributions_in_label_order(tiny):
    import torch

    scorer = make_scorer(tiny)
    result = scorer.score(SENTENCES)
    assert result.probs.dtype == np.float32
    assert result.probs.shape == (len(SENTENCES), 2)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-6)
    assert ((result.probs > 0) & (result.probs < 1)).all()
    assert not result.truncated.any()

    # Column j is the softmax of the logit of label j's first token, computed by hand.
    model, tokenizer = tiny
    ids = tokenizer(TEMPLATE.prompt(SENTENCES[0]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    expected = torch.softmax(logits[scorer.label_token_ids], dim=-1).numpy()
    np.testing.assert_allclose(result.probs[0], expected, atol=1e-5)

    # Reversing the label set reverses the columns.
    flipped = make_scorer(tiny, labels=LabelSet(["Negative", "Positive"])).score(SENTENCES)
    np.testing.assert_allclose(flipped.probs, result.probs[:, ::-1], atol=1e-6)
    assert result.prompt_tokens == sum(len(tokenizer(TEMPLATE.prompt(s))["input_ids"]) for s in SENTENCES)
    assert result.predicted() == [LABELS.labels[i] for i in result.probs.argmax(axis=1)]


def test_independent_of_batch_size_order_and_padding(tiny):
    alone = np.stack([make_scorer(tiny, batch_size=1).score([s]).probs[0] for s in SENTENCES])
    # The sentences differ in length, so batches of 8 and 3 left-pad most rows.
    for batch_size in (3, 8):
        np.testing.assert_allclose(make_scorer(tiny, batch_size=batch_size).score(SENTENCES).probs, alone, atol=1e-5)
    order = np.random.default_rng(0).permutation(len(SENTENCES))
    shuffled = make_scorer(tiny, batch_size=3).score([SENTENCES[i] for i in order])
    np.testing.assert_allclose(shuffled.probs, alone[order], atol=1e-5)


def test_padding_invariance_check_has_power(tiny):
    """Negative control: scoring padded rows *without* the attention mask changes the
    probabilities far beyond the 1e-5 tolerance used above, so that test can fail."""
    import torch

    from sentiment_ray.scoring import _left_pad

    model, tokenizer = tiny
    scorer = make_scorer(tiny)
    ids, _ = scorer.encode(SENTENCES[:3])
    input_ids, _, _ = _left_pad(ids, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, -1][:, scorer.label_token_ids]
    unmasked = torch.softmax(logits, dim=-1).numpy()
    masked = scorer.score(SENTENCES[:3]).probs
    assert np.abs(unmasked - masked).max() > 1e-4


def test_scoring_ids_equal_trl_prompt_tokens(tiny, tmp_path):
    """What the scorer feeds the model is exactly the prompt part of what TRL 1.15's
    SFTTrainer trains on for a prompt-completion record (BOS included)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = tiny
    records = [TEMPLATE.prompt_completion(s, "Positive", tokenizer.eos_token) for s in SENTENCES]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        report_to=[],
        completion_only_loss=True,
        max_length=256,
        packing=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    ids, _ = make_scorer(tiny).encode(SENTENCES)
    assert tokenizer.bos_token_id == ids[0][0]  # the tiny tokenizer adds BOS, like Llama's
    for row, scorer_ids in zip(trainer.train_dataset, ids):
        # TRL 1.15 turns the completion mask into labels: -100 on the prompt tokens.
        prompt_len = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert row["input_ids"][:prompt_len] == scorer_ids
        # ... and the first trained token is the label's first token the scorer reads.
        assert row["input_ids"][prompt_len] == make_scorer(tiny).label_token_ids[0]


def test_truncation_cuts_only_the_sentence_of_long_rows(tiny):
    from sentiment_ray.scoring import fit_prompts

    model, tokenizer = tiny
    max_length = 60
    long_sentence = "the acting was wonderful and the story moving " * 30
    sentences = ["short and sweet", long_sentence, "also short", "日本語のテキスト" * 40]
    prompts, ids, truncated = fit_prompts(tokenizer, TEMPLATE, sentences, max_length)
    assert truncated.tolist() == [False, True, False, True]
    assert all(len(x) <= max_length for x in ids)
    assert prompts[0] == TEMPLATE.prompt("short and sweet")
    for row in (1, 3):
        assert prompts[row].startswith(TEMPLATE.prompt("").split("{sentence}")[0][:40])
        assert prompts[row].endswith(TEMPLATE.response_header)
        assert ids[row] == tokenizer(prompts[row])["input_ids"]
        assert len(ids[row]) >= max_length - 3  # the cut keeps what fits, not much less
    assert "\ufffd" not in prompts[3]
    # The kept sentence text is a prefix of the original.
    kept = prompts[1][len(TEMPLATE.prompt("")) - len(TEMPLATE.separator + TEMPLATE.response_header) :]
    kept = kept[: -len(TEMPLATE.separator + TEMPLATE.response_header)]
    assert long_sentence.startswith(kept)
    assert 10 < len(kept) < len(long_sentence)

    scorer = make_scorer(tiny, max_length=max_length)
    result = scorer.score(sentences)
    assert result.truncated.tolist() == [False, True, False, True]
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-6)


def test_template_too_long_for_max_length_errors(tiny):
    from sentiment_ray.scoring import ScoringError

    with pytest.raises(ScoringError, match="leaves no room for a sentence"):
        make_scorer(tiny, max_length=10).score(["a sentence that does not fit"])


def test_non_text_input_names_the_row(tiny):
    from sentiment_ray.scoring import ScoringError

    with pytest.raises(ScoringError, match="row 1"):
        make_scorer(tiny).score(["fine", None, "fine"])


def test_empty_input(tiny):
    result = make_scorer(tiny).score([])
    assert result.probs.shape == (0, 2)
    assert result.prompt_tokens == 0


def test_generate_counts_parse_failures(tiny):
    result = make_scorer(tiny, batch_size=3).generate(SENTENCES, max_new_tokens=3)
    assert len(result.texts) == len(result.labels) == len(SENTENCES)
    assert result.parse_failed.tolist() == [label is None for label in result.labels]
    for text, label in zip(result.texts, result.labels):
        assert label == LABELS.parse_generated(text)
    # A random model's continuation is junk: most rows fail to parse, none is defaulted.
    assert result.parse_failed.sum() >= len(SENTENCES) // 2
    # Batched left-padded generation equals one-at-a-time generation (greedy).
    alone = [make_scorer(tiny, batch_size=1).generate([s], max_new_tokens=3).texts[0] for s in SENTENCES[:3]]
    assert result.texts[:3] == alone


def _demo_rows(n: int) -> tuple[list[str], list[str]]:
    with open(DEMO_CSV, newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f))]
    return [r["sentence"] for r in rows], [r["label"] for r in rows]


def test_validation_scoring_reports_metrics_and_ece(tiny):
    import pyarrow as pa

    from sentiment_ray.train.evaluation import evaluate_split

    sentences, labels = _demo_rows(16)
    langs = ["en"] * 8 + ["es"] * 8
    scorer = make_scorer(tiny, batch_size=8)
    report, scores = evaluate_split(scorer, pa.table({"sentence": sentences, "label": labels, "lang": langs}))
    predicted = scorer.score(sentences).predicted()
    assert scores.predicted() == predicted
    assert report["n"] == 16
    assert report["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, labels)]))
    assert 0.0 <= report["ece"] <= 1.0
    assert sum(b["count"] for b in report["calibration_bins"]) == 16
    assert set(report["per_language"]) == {"en", "es"}
    assert report["prompt_tokens"] == scores.prompt_tokens
    assert report["truncated"] == int(scores.truncated.sum())


@pytest.mark.slow
def test_demo_model_scores_demo_sentences(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentiment_ray.scoring import LabelScorer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32").eval()
    scorer = LabelScorer(model, tokenizer, TEMPLATE, LABELS, max_length=512, batch_size=8)
    assert len(set(scorer.label_token_ids)) == 2
    sentences, _ = _demo_rows(8)
    result = scorer.score(sentences)
    assert ((result.probs > 0) & (result.probs < 1)).all()
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)
    alone = scorer.score(sentences[:1]).probs[0]
    np.testing.assert_allclose(result.probs[0], alone, atol=1e-4)


def test_non_finite_logits_error_names_the_rows(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentiment_ray.scoring import ScoringError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    tiny = (model, AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises(ScoringError, match=r"non-finite label logits for rows \[0, 1\]"):
        make_scorer(tiny).score(SENTENCES[:2])


def test_micro_batches_cap_rows_and_padded_tokens():
    from sentiment_ray.scoring import micro_batches

    lengths = [10, 200, 30, 30, 5, 120, 30]
    batches = micro_batches(lengths, batch_size=3)
    assert [list(b) for b in batches] == [[1, 5, 2], [3, 6, 0], [4]]  # longest first, 3 rows each
    budgeted = micro_batches(lengths, batch_size=100, max_batch_tokens=240)
    # every row exactly once; no batch over the budget unless one row alone exceeds it
    assert sorted(int(r) for b in budgeted for r in b) == list(range(len(lengths)))
    for b in budgeted:
        assert len(b) * max(lengths[r] for r in b) <= 240 or len(b) == 1
    assert [len(b) for b in budgeted] == [1, 2, 4]  # 200 alone; 120+30; the short rows together
    assert [list(b) for b in micro_batches([300], batch_size=4, max_batch_tokens=100)] == [[0]]


def test_token_budget_batching_gives_the_same_scores(tiny):
    sentences = ["good " * n for n in (1, 40, 3, 17, 2, 60, 5)]
    scorer = make_scorer(tiny, batch_size=7)
    by_rows = scorer.score(sentences).probs
    scorer.max_batch_tokens = 64
    assert len(scorer._micro_batches(scorer.encode(sentences)[0])) > 1
    np.testing.assert_allclose(by_rows, scorer.score(sentences).probs, atol=1e-5)


def test_the_shared_prefix_runs_once_and_gives_the_same_probabilities_as_whole_prompts(tiny):
    """Prefix reuse: the instruction's tokens run once per call, each batch continues from
    their key/value cache; the probabilities equal whole-prompt scoring (float32)."""
    from sentiment_ray.scoring import LabelScorer

    model, tokenizer = tiny
    sentences, _ = _demo_rows(40)
    sentences += SENTENCES + [" leading space", "\nleading newline"]
    reused = LabelScorer(model, tokenizer, TEMPLATE, LABELS, max_length=128, batch_size=None, max_batch_tokens=512)
    whole = LabelScorer(
        model, tokenizer, TEMPLATE, LABELS, max_length=128, batch_size=None, max_batch_tokens=512, reuse_prefix=False
    )
    assert len(reused.prefix_ids) > 10
    assert whole.prefix_ids == []
    a, b = reused.score(sentences), whole.score(sentences)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    # Tokens are counted the same way (every prompt token); the prefix is computed once.
    assert a.prompt_tokens == b.prompt_tokens == b.computed_tokens
    shared, _ = reused._split_by_prefix(reused.encode(sentences)[0])
    assert a.computed_tokens == b.prompt_tokens - (len(shared) - 1) * len(reused.prefix_ids)


def test_token_budget_batches_give_the_same_predictions_as_any_row_cap(tiny):
    from sentiment_ray.scoring import LabelScorer

    model, tokenizer = tiny
    sentences, _ = _demo_rows(48)
    reference = LabelScorer(model, tokenizer, TEMPLATE, LABELS, max_length=128, batch_size=1).score(sentences)
    for batch_size, budget in ((None, 300), (None, 4096), (7, 0), (64, 1000)):
        result = LabelScorer(model, tokenizer, TEMPLATE, LABELS, 128, batch_size, budget).score(sentences)
        assert result.predicted() == reference.predicted(), (batch_size, budget)
        np.testing.assert_allclose(result.probs, reference.probs, atol=1e-4)


def test_a_temperature_divides_the_label_logits():
    from sentiment_ray.scoring import softmax

    logits = np.array([[2.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(softmax(logits)[0], [0.8808, 0.1192], atol=1e-4)
    np.testing.assert_allclose(softmax(logits / 2.0)[0], [0.7311, 0.2689], atol=1e-4)
    np.testing.assert_allclose(softmax(logits)[1], [0.5, 0.5])
