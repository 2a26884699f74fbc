"""Tiny random vision models (ViT, ViT classifier, DeiT, DINOv2) and inputs for exactness tests."""

import torch
from transformers import DeiTConfig, DeiTModel, Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification, ViTModel

_COMMON = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=5, num_attention_heads=4)
VISION_KINDS = ["vit", "vit-classifier", "deit", "dinov2"]


def make_tiny_vision(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random vision model (16 x 16 px, 4 x 4 patches, width 24, 4 heads, 5 layers) in float64, eval mode.

    LayerNorm weights and biases and DINOv2's LayerScale are randomised, so their folding is exercised.
    """
    torch.manual_seed(seed)
    kw = {**_COMMON, **overrides}
    if kind == "vit":
        model = ViTModel(ViTConfig(**kw, intermediate_size=40))
    elif kind == "vit-classifier":
        model = ViTForImageClassification(ViTConfig(**kw, intermediate_size=40, num_labels=7))
    elif kind == "deit":  # CLS + distillation token
        model = DeiTModel(DeiTConfig(**kw, intermediate_size=40))
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(**kw, mlp_ratio=2, layerscale_value=0.5))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias") or "lambda1" in name or "token" in name:
                p.normal_(0, 0.3)
    return model.to(torch.float64).eval()


def pixels(n: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's final hidden state (after its last LayerNorm), also for a classifier."""
    return model.base_model(pixel_values=x).last_hidden_state
