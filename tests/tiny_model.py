"""Build a tiny random Llama + a small BPE tokenizer trained on the demo data, offline.

Used by the test fixtures (tests/conftest.py) and by scripts that need a model without
downloads. A few seconds on one CPU core; the folder loads with `from_pretrained` like any
HF checkpoint (and through `models.resolve_model_path` as a local path).
"""

from __future__ import annotations

import csv
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CSV = REPO_ROOT / "data" / "demo" / "sentiment_demo.csv"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def demo_rows(start: int, stop: int) -> list[dict]:
    """Rows [start, stop) of the demo sample as dicts (IDs as strings): test inputs."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(DEMO_CSV, convert_options=pacsv.ConvertOptions(column_types={"ID": pa.string()}))
    return table.slice(start, stop - start).to_pylist()


def _training_texts(demo_csv: Path) -> list[str]:
    from sentiment_ray.config import PromptConfig
    from sentiment_ray.prompts import PromptTemplate

    with open(demo_csv, newline="", encoding="utf-8") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f)]
    prompt_cfg = PromptConfig()
    template = PromptTemplate.from_config(prompt_cfg)
    # The full training text of each label, repeated, so the template pieces and the label
    # words become whole tokens (distinct first tokens after "### Response:\n").
    framed = [template.full_text("x", label, EOS) for label in prompt_cfg.labels] * 50
    return sentences + framed


def build_tiny_tokenizer(demo_csv: Path = DEMO_CSV, vocab_size: int = 2000):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation) that adds BOS like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(demo_csv), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # BOS on every encoding, as Llama tokenizers do: the scoring/TRL consistency test then
    # checks BOS handling for real.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, demo_csv: Path = DEMO_CSV) -> Path:
    """Write a tiny random LlamaForCausalLM + its tokenizer into `out_dir`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(demo_csv)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def build_tiny_adapter(model_dir: str, out_dir: str | Path, targets: list[str], *, seed: int, b_std: float) -> str:
    """A LoRA adapter (r 4, alpha 8, dropout 0) on `targets` of a tiny model, with random
    non-zero B matrices (normal, `b_std`), so that it changes the model's scores."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return str(out_dir)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere
    target = sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"
    print(build_tiny_model(target))
