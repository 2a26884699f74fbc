"""Qwen2 / Qwen1.5 / Qwen2.5: the Llama layout with q/k/v biases (carried by the Linear modules).

The sliding window applies only to layers whose ``layer_types`` say ``sliding_attention``.
"""

from __future__ import annotations

from flatten_lightning.adapters.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    model_types = ("qwen2",)

    def max_window(self) -> int | None:
        cfg = self.config
        window = getattr(cfg, "sliding_window", None)
        if window is None or "sliding_attention" not in (getattr(cfg, "layer_types", None) or []):
            return None
        return int(window)
