"""Label-token scoring: one forward pass per batch, softmax over the labels' first tokens.

For each sentence the prompt (instruction + input + response header) is run through the
model once; the next-token logits at the prompt's last position, restricted to the first
token of each label, give P(label | prompt). No decode loop, no parsing, a probability per
class. `LabelScorer.generate` keeps the generate-and-parse mode for comparison, counting
parse failures instead of defaulting them.

Every prompt starts with the same instruction. By default (`reuse_prefix`) that shared prefix
runs through the model once per call, and each batch continues from its key/value cache with
only the rows' own tokens (same positions, same attention, so the same probabilities); rows
whose tokens do not start with the prefix are scored whole. Prompt tokens are counted the
same either way (every token of every prompt: `prompt_tokens`); what the model actually ran
is `computed_tokens`.

Probabilities are softmax(label logits / temperature): a temperature fitted on validation
data after training (calibration.py) makes them honest; 1 leaves them as the model gives.

Tokenisation matches what TRL 1.15 trains on: a prompt-completion record is tokenised as
`tokenizer(prompt)` and `tokenizer(prompt + completion)` with the tokenizer's default special
tokens (BOS where the tokenizer adds one), and the completion starts where they diverge. The
scorer feeds exactly `tokenizer(prompt)["input_ids"]`.

torch is imported lazily (inside functions), so importing this module stays cheap.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate


class ScoringError(ValueError):
    pass


def compile_scoring(setting: str, device: Any, adapter_form: str) -> bool:
    """Whether the scoring forward is compiled for `label.compile=setting`: `auto` compiles
    on a GPU when the adapter is merged or absent (peft's and Unsloth's LoRA layers break
    the graph into pieces), never on a CPU (compiling there takes longer than it saves)."""
    if setting == "true":
        return True
    if setting == "false":
        return False
    return getattr(device, "type", str(device)) == "cuda" and adapter_form in ("merged", "none")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


@dataclass
class ScoreResult:
    probs: np.ndarray
    """float32 [n, k]: P(label) per row, columns in label-set order, rows in input order."""
    truncated: np.ndarray
    """bool [n]: the sentence was cut so the prompt fits in max_length."""
    prompt_tokens: int
    """Tokens of the prompts (prefix included), padding excluded."""
    labels: tuple[str, ...]
    logits: np.ndarray | None = None
    """float32 [n, k]: the label tokens' logits (before the temperature)."""
    computed_tokens: int | None = None
    """Tokens the model ran: the shared prefix once, then each row's own tokens."""

    def predicted(self) -> list[str]:
        return [self.labels[i] for i in self.probs.argmax(axis=1)] if len(self.probs) else []

    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1) if len(self.probs) else np.zeros(0, dtype=np.float32)


@dataclass
class GenerateResult:
    texts: list[str]
    """The generated continuation after the response header (special tokens removed)."""
    labels: list[str | None]
    """The parsed label, None where the text starts with no label."""
    parse_failed: np.ndarray
    """bool [n]: `labels[i] is None`."""
    prompt_tokens: int
    truncated: np.ndarray


# ----------------------------------------------------------------------------- prompts


def _check_sentences(sentences: Sequence[Any]) -> list[str]:
    out = list(sentences)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise ScoringError(f"sentence at row {i} of the batch is {type(s).__name__} {s!r}, not text")
    return out


def _encode(tokenizer: Any, texts: list[str], **kwargs: Any) -> list[list[int]]:
    # One batched call: fast tokenizers encode the whole list in Rust, in parallel.
    return tokenizer(texts, return_attention_mask=False, **kwargs)["input_ids"] if texts else []


def fit_prompts(
    tokenizer: Any, template: PromptTemplate, sentences: Sequence[str], max_length: int
) -> tuple[list[str], list[list[int]], np.ndarray]:
    """Build each prompt and tokenise it as TRL does; cut the *sentence* of over-long ones.

    Returns (prompt texts, prompt token ids, truncated flags). The instruction and the
    response header are always kept whole; a too-long sentence is cut to the tokens that
    fit, decoded back to text and re-tokenised inside the template (so the ids are what
    `tokenizer(prompt)` gives for that text, exactly as training would see it). Training
    can call this with `max_length = max_seq_length - <completion tokens>` to truncate
    the same way.
    """
    sentences = _check_sentences(sentences)
    prompts = [template.prompt(s) for s in sentences]
    ids = _encode(tokenizer, prompts)
    truncated = np.array([len(x) > max_length for x in ids], dtype=bool)
    long_rows = np.flatnonzero(truncated).tolist()
    if not long_rows:
        return prompts, ids, truncated

    overhead = len(_encode(tokenizer, [template.prompt("")])[0])
    if overhead >= max_length:
        raise ScoringError(
            f"the prompt template alone takes {overhead} tokens, which leaves no room for a sentence "
            f"within max_length={max_length}; raise model.max_seq_length or shorten prompt.instruction"
        )
    sentence_ids = _encode(tokenizer, [sentences[i] for i in long_rows], add_special_tokens=False)
    budget = {row: max_length - overhead for row in long_rows}
    pending = dict(zip(long_rows, sentence_ids))
    # Re-tokenising decoded text can merge differently at the cut, so shrink until it fits
    # (almost always one round).
    while pending:
        rows = list(pending)
        cut_texts = tokenizer.batch_decode([pending[r][: max(budget[r], 0)] for r in rows], clean_up_tokenization_spaces=False)
        # A cut inside a multi-byte character decodes to U+FFFD; drop the partial character.
        cut_texts = [t.rstrip("\ufffd") for t in cut_texts]
        new_prompts = [template.prompt(t) for t in cut_texts]
        new_ids = _encode(tokenizer, new_prompts)
        for r, p, x in zip(rows, new_prompts, new_ids):
            if len(x) <= max_length or budget[r] <= 0:
                prompts[r], ids[r] = p, x
                del pending[r]
            else:
                budget[r] -= len(x) - max_length
    return prompts, ids, truncated


def softmax(logits: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Row-wise softmax computed in float64, returned as `dtype` (float32: what predictions
    carry; calibration keeps float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(dtype, copy=False)


# ----------------------------------------------------------------------------- batching


def micro_batches(lengths: Sequence[int], batch_size: int | None, max_batch_tokens: int = 0) -> list[np.ndarray]:
    """Row indices per forward pass: longest first, so rows of similar length share a batch
    (little padding) and an out-of-memory shows up on the first batch, not the last. A batch
    holds at most `max_batch_tokens` padded tokens (rows x its longest row; a single longer
    row still gets its own batch) when that is > 0, and at most `batch_size` rows when that
    is set. Short rows thus ride in wide batches, which keeps a GPU busy, and long ones in
    narrow batches, which keeps memory bounded."""
    if not batch_size and max_batch_tokens <= 0:
        raise ScoringError("a batch needs a bound: set label.max_batch_tokens > 0 or label.batch_size")
    cap = batch_size or len(lengths) or 1
    order = np.argsort([-n for n in lengths], kind="stable")
    out, start = [], 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)  # the longest row of this batch
        rows = cap if max_batch_tokens <= 0 else max(1, min(cap, max_batch_tokens // width))
        out.append(order[start : start + rows])
        start += rows
    return out


def _left_pad(batch_ids: list[list[int]], pad_id: int, device: Any):
    """(input_ids, attention_mask, position_ids), padded on the left so every row's last
    real token sits at the final position; positions count real tokens only, as
    `generate` does, so a padded row computes the same as the row alone."""
    import torch

    width = max(len(x) for x in batch_ids)
    ids = np.full((len(batch_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch_ids), width), dtype=np.int64)
    for row, x in enumerate(batch_ids):
        ids[row, width - len(x) :] = x
        mask[row, width - len(x) :] = 1
    positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return to(ids), to(mask), to(positions)


def model_device(model: Any):
    device = getattr(model, "device", None)
    if device is not None:
        return device
    return next(model.parameters()).device


def _logits_to_keep_arg(model: Any) -> str | None:
    """The name under which the (innermost) causal LM accepts 'compute logits for the last N
    positions only', or None. peft wrappers forward **kwargs, so look at the base model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


def _cpu_bf16_autocast(model: Any, device: Any):
    """bf16 autocast for a bf16 model on the CPU: its float32 LoRA weights then run in bf16
    too instead of upcasting every activation.
    A no-op elsewhere (GPU backends manage their own precision)."""
    import contextlib

    import torch

    if getattr(device, "type", str(device)) == "cpu" and getattr(model, "dtype", None) == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Architectures whose forward takes a key/value cache of the shared prefix the standard way
# (a transformers Cache, positions and a 2-D mask continuing after it) on both backends.
PREFIX_CACHE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _cache_tensors(past: Any) -> list[tuple[Any, Any]]:
    """Per layer (keys, values) of what a forward with use_cache=True returned: a
    transformers Cache (layers with .keys / .values) or a tuple of (keys, values)."""
    layers = getattr(past, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v in past]


def _expanded_cache(layers: list[tuple[Any, Any]], batch: int):
    """A DynamicCache holding the prefix for `batch` rows (broadcast views, no copies)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (k, v) in enumerate(layers):
        cache.update(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]), index)
    return cache


class _EvalMode:
    """Dropout off while scoring; the model's previous train/eval mode restored after
    (training evaluates mid-run with the model in train mode)."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


# ----------------------------------------------------------------------------- scorer


class LabelScorer:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: PromptTemplate,
        labels: LabelSet,
        max_length: int,
        batch_size: int | None,
        max_batch_tokens: int = 0,
        *,
        reuse_prefix: bool = True,
        temperature: float = 1.0,
        compile: bool = False,
    ):
        if max_length <= 0 or (batch_size is not None and batch_size <= 0) or max_batch_tokens < 0:
            raise ScoringError(
                f"max_length and batch_size must be positive and max_batch_tokens >= 0, "
                f"got {max_length}, {batch_size}, {max_batch_tokens}"
            )
        if not batch_size and not max_batch_tokens:
            raise ScoringError("a batch needs a bound: set label.max_batch_tokens > 0 or label.batch_size")
        if not temperature > 0:
            raise ScoringError(f"temperature must be positive, got {temperature}")
        if tokenizer.pad_token_id is None:
            raise ScoringError("the tokenizer has no pad token; load it through a backend (pad = eos)")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.labels = labels
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.label_token_ids = labels.first_token_ids(
            lambda text: tokenizer(text)["input_ids"], template.prompt("An example sentence.")
        )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = head.weight.shape[0] if head is not None else None
        if vocab is not None and max(self.label_token_ids) >= vocab:
            raise ScoringError(
                f"label token ids {self.label_token_ids} exceed the model's vocabulary ({vocab}): "
                "tokenizer and model do not match"
            )
        self._keep_arg = _logits_to_keep_arg(model)
        self.temperature = float(temperature)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.prefix_ids = self._shared_prefix() if reuse_prefix and model_type in PREFIX_CACHE_MODEL_TYPES else []
        self.compiled = False
        self.compile_seconds = 0.0
        self._forward = model
        if compile:
            self._compile()

    def _compile(self) -> None:
        """Score through `torch.compile(model, dynamic=True)`: one graph serves every batch
        shape (rows and width vary with the token budget), so nothing recompiles per batch.
        Compilation itself happens on the first forward (`warm_up`)."""
        import torch

        try:
            self._forward = torch.compile(self.model, dynamic=True)
            self.compiled = True
        except Exception as err:  # noqa: BLE001 - any failure means the eager forward
            self._fall_back(err)

    def _fall_back(self, err: BaseException) -> None:
        warnings.warn(
            f"the scoring forward did not compile ({type(err).__name__}: {_first_line(err)}); scoring eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        self._forward = self.model
        self.compiled = False

    def warm_up(self, sentences: Sequence[str]) -> None:
        """Score `sentences` once so that kernel selection, allocator growth and (when
        compiled) compilation happen now; a compiled forward that fails here falls back to
        the eager one. `compile_seconds`: the time of this first call when compiled."""
        started = time.perf_counter()
        self.score(sentences)
        if self.compiled:
            self.score(sentences[: max(1, len(sentences) // 2)])  # a second shape: the dynamic graph
            self.compile_seconds = time.perf_counter() - started

    def _shared_prefix(self) -> list[int]:
        """The token ids every prompt starts with: the common start of two very different
        prompts (rows that do not start with it are scored whole)."""
        a = self.tokenizer(self.template.prompt("x"))["input_ids"]
        b = self.tokenizer(self.template.prompt("Zq 1 \u00e9"))["input_ids"]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return list(a[:n]) if n >= 2 else []

    # -- helpers

    def encode(self, sentences: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Prompt token ids (what the model sees) and truncation flags, in input order."""
        _, ids, truncated = fit_prompts(self.tokenizer, self.template, sentences, self.max_length)
        return ids, truncated

    def _micro_batches(self, ids: list[list[int]]):
        return micro_batches([len(x) for x in ids], self.batch_size, self.max_batch_tokens)

    def _split_by_prefix(self, ids: list[list[int]]) -> tuple[list[int], list[int]]:
        """(rows that start with the shared prefix and have tokens after it, the others)."""
        p = self.prefix_ids
        if not p:
            return [], list(range(len(ids)))
        shared, whole = [], []
        for r, x in enumerate(ids):
            (shared if len(x) > len(p) and x[: len(p)] == p else whole).append(r)
        return shared, whole

    # -- scoring

    def score(self, sentences: Sequence[str]) -> ScoreResult:
        return self.score_ids(*self.encode(sentences))

    def score_ids(
        self, ids: list[list[int]], truncated: np.ndarray, on_batch: Callable[[int], None] | None = None
    ) -> ScoreResult:
        """`score` for prompts already encoded by `encode` (the labeller encodes the next
        chunk in a reader thread while the model scores this one). `on_batch(rows)` is
        called after each micro-batch is handed to the model (progress; no device sync)."""
        import torch

        k = len(self.labels)
        if not ids:
            empty = np.zeros((0, k), dtype=np.float32)
            return ScoreResult(empty, truncated, 0, self.labels.labels, empty, 0)
        device = model_device(self.model)
        label_ids = torch.tensor(self.label_token_ids, device=device)
        extra = {self._keep_arg: 1} if self._keep_arg else {}
        pad = self.tokenizer.pad_token_id
        shared, whole = self._split_by_prefix(ids)
        p = len(self.prefix_ids)
        batches, outputs = [], []
        computed = 0
        with _EvalMode(self.model), torch.inference_mode(), _cpu_bf16_autocast(self.model, device):
            for members, offset in ((shared, p), (whole, 0)):
                if not members:
                    continue
                layers = None
                if offset:
                    # Once per call: training scores between optimizer steps, when the weights changed.
                    prefix = torch.tensor([self.prefix_ids], device=device)
                    layers = _cache_tensors(self.model(input_ids=prefix, use_cache=True, **extra).past_key_values)
                    computed += offset
                own = [ids[r][offset:] for r in members]
                for rows in micro_batches([len(x) for x in own], self.batch_size, self.max_batch_tokens):
                    input_ids, mask, positions = _left_pad([own[r] for r in rows], pad, device)
                    cache = {}
                    if layers is not None:
                        mask = torch.cat([torch.ones((len(rows), offset), dtype=mask.dtype, device=device), mask], dim=1)
                        cache = {"past_key_values": _expanded_cache(layers, len(rows)), "use_cache": True}
                    out = self._run(
                        input_ids=input_ids,
                        attention_mask=mask,
                        position_ids=positions + offset,
                        **(cache or {"use_cache": False}),
                        **extra,
                    )
                    batches.append(np.asarray(members)[rows])
                    # Kept on the device: a copy to the host per batch would wait for the GPU
                    # each time and leave it idle while Python prepares the next batch.
                    outputs.append(out.logits[:, -1, :].index_select(-1, label_ids).float())
                    computed += sum(len(own[r]) for r in rows)
                    if on_batch is not None:
                        on_batch(len(rows))
            gathered = torch.cat(outputs).cpu().numpy()
        logits = np.zeros((len(ids), k), dtype=np.float32)
        logits[np.concatenate(batches)] = gathered
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
        if len(bad):
            # fp16 overflow or broken weights: never hand NaN on as a prediction.
            raise ScoringError(f"the model produced non-finite label logits for rows {bad[:10].tolist()} of the batch")
        probs = softmax(logits / self.temperature)
        return ScoreResult(probs, truncated, int(sum(len(x) for x in ids)), self.labels.labels, logits, computed)

    def _run(self, **inputs: Any):
        """One forward: the compiled one when there is one; if it fails, once, a warning
        and the eager forward from then on (the batch is redone eagerly)."""
        if not self.compiled:
            return self.model(**inputs)
        try:
            return self._forward(**inputs)
        except Exception as err:  # noqa: BLE001 - a compiler failure must not stop labelling
            self._fall_back(err)
            return self.model(**inputs)

    # -- generate-and-parse (for comparison with scoring)

    def generate(
        self, sentences: Sequence[str], max_new_tokens: int, on_batch: Callable[[int], None] | None = None
    ) -> GenerateResult:
        import torch

        ids, truncated = self.encode(sentences)
        texts: list[str] = [""] * len(ids)
        device = model_device(self.model)
        tok = self.tokenizer
        with _EvalMode(self.model), torch.inference_mode():
            for rows in self._micro_batches(ids):
                input_ids, mask, _ = _left_pad([ids[r] for r in rows], tok.pad_token_id, device)
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                new = out[:, input_ids.shape[1] :].cpu().tolist()
                for r, text in zip(rows, tok.batch_decode(new, skip_special_tokens=True)):
                    texts[r] = text
                if on_batch is not None:
                    on_batch(len(rows))
        parsed = [self.labels.parse_generated(t) for t in texts]
        return GenerateResult(
            texts=texts,
            labels=parsed,
            parse_failed=np.array([p is None for p in parsed], dtype=bool),
            prompt_tokens=int(sum(len(x) for x in ids)),
            truncated=truncated,
        )
