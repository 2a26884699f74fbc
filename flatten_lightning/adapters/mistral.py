"""Mistral: the Llama layout with an optional sliding attention window."""

from __future__ import annotations

from flatten_lightning.adapters.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    model_types = ("mistral",)

    def max_window(self) -> int | None:
        # Calibration runs blocks without a mask, which is exact only inside the window.
        window = getattr(self.config, "sliding_window", None)
        return None if window is None else int(window)
