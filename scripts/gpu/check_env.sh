#!/usr/bin/env bash
# Device call 1 of the sequence (scripts/gpu/README.md): installs the carried .whl (through
# remote_setup.sh) and checks the GPU image: driver, torch/CUDA, which of our dependencies the
# image already has, the installed versions, `import unsloth` (timed, cold .pyc), bitsandbytes
# 4-bit + 8-bit Adam on the GPU, ray, and sentiment_ray's pure modules.
. scripts/gpu/remote_setup.sh || exit 1
set -o pipefail
nvidia-smi -L; uname -r; nproc
echo "--- on the image alone (no /tmp/site):"
env -u PYTHONPATH python3 - <<'PY'
import importlib.metadata as md
for n in ["pyyaml", "pydantic", "pyarrow", "pandas", "fsspec", "matplotlib", "peft", "gguf",
          "accelerate", "transformers", "torch", "triton", "numpy", "datasets", "trl", "ray",
          "bitsandbytes", "unsloth", "xformers", "flash-attn"]:
    try:
        print(f"  image {n:13s} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  image {n:13s} MISSING")
PY
echo "--- with /tmp/site:"
python3 - <<'PY'
import importlib.metadata as md, importlib.util
for n in ["pydantic", "gguf", "datasets", "trl", "ray", "bitsandbytes", "unsloth", "unsloth_zoo",
          "torchao", "cut_cross_entropy"]:
    try:
        d = md.distribution(n)
        print(f"  site {n:18s} {d.version:14s} {d.locate_file('')}")
    except md.PackageNotFoundError:
        print(f"  site {n:18s} MISSING")
PY
python3 - <<'PY'
import time
t = time.time()
import unsloth
print(f"import unsloth (cold .pyc, fresh process): {time.time() - t:.1f}s  unsloth {unsloth.__version__}")
import torch, transformers, trl, peft, bitsandbytes as bnb
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "cap", torch.cuda.get_device_capability(0), "| transformers", transformers.__version__,
      "trl", trl.__version__, "peft", peft.__version__, "bnb", bnb.__version__)
try:
    from unsloth.utils import attention_dispatch as a
    print("unsloth attention: torch varlen_attn", a._TORCH_VARLEN_ATTN is not None,
          "| SDPA packed segments", a._SDPA_PACKED_SEGMENTS, "| lean varlen", a._LEAN_VARLEN,
          "| flash available", torch.backends.cuda.is_flash_attention_available())
    from unsloth.kernels import fast_lora
    print("unsloth TRACE_LORA_FUNCTIONS (enables per-block compile):", fast_lora.TRACE_LORA_FUNCTIONS)
except Exception as e:
    print("unsloth internals check failed:", type(e).__name__, e)
l = bnb.nn.Linear4bit(576, 1536, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
x = torch.randn(8, 576, device="cuda", dtype=torch.bfloat16, requires_grad=True)
y = l(x); y.float().sum().backward()
p = torch.nn.Parameter(torch.randn(4096, 64, device="cuda")); p.grad = torch.randn_like(p)
opt = bnb.optim.AdamW8bit([p]); opt.step()
print("bitsandbytes 4-bit fwd/bwd ok", tuple(y.shape), "grad", bool(torch.isfinite(x.grad).all()),
      "| AdamW8bit step ok")
PY
python3 -c "import ray, sentiment_ray.config, sentiment_ray.prompts, sentiment_ray.models; print('ray', ray.__version__, '| sentiment_ray pure modules import ok')"
