"""DeiT (HF ``DeiTModel`` / ``DeiTForImageClassification``): the ViT block layout; the distillation token
is a second special token the embeddings add next to CLS, so only the token count differs from ViT."""

from __future__ import annotations

from flatten_lightning.adapters.vit import ViTAdapter


class DeiTAdapter(ViTAdapter):
    model_types = ("deit",)
