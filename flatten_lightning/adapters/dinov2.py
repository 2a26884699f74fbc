"""DINOv2 (HF ``Dinov2Model``): ViT blocks named ``norm1`` / ``norm2`` under ``base.encoder.layer``, with
LayerScale on both branches: A(h) = lambda1 * Attn(N(h)), M(u) = lambda2 * MLP(N'(u)).

``read`` folds lambda into the output projections (W_o <- diag(lambda1) W_o, b_o <- lambda1 * b_o,
likewise fc2 with lambda2); ``write`` stores the folded projections and sets both lambdas to one, so
a written block is still a stock ``Dinov2Layer``. Position embeddings are always interpolated to the
input size (``embed`` runs the model's own embeddings). The SwiGLU FFN (DINOv2-g) is refused.
"""

from __future__ import annotations

from torch import nn

from flatten_lightning.adapters.vit import ViTAdapter


class Dinov2Adapter(ViTAdapter):
    model_types = ("dinov2",)
    attn_norm_name, mlp_norm_name = "norm1", "norm2"
    attn_scale_name, mlp_scale_name = "layer_scale1", "layer_scale2"

    def check(self) -> None:
        if getattr(self.config, "use_swiglu_ffn", False):
            self.fail("the SwiGLU FFN (fused weights_in) of DINOv2-g")
        super().check()

    def blocks(self) -> nn.ModuleList:
        return self.base().encoder.layer

    def set_blocks(self, blocks: list[nn.Module]) -> None:
        self.base().encoder.layer = nn.ModuleList(blocks)

    def install(self, blocks: list[nn.Module], groups: list[list[int]]) -> None:
        """Also renumber the backbone stages: stage j is the output of new block j, and a stage the config
        exports (``out_indices``; the last one by default) moves to the block that now produces it, to
        the end of the group that swallowed it, or, when its block was removed, to the last block before it."""
        cfg = self.config
        n_old = len(cfg.stage_names)
        old = [i % n_old for i in (cfg.out_indices or [])]
        # Stage i is the output of original block i - 1: its new stage counts the new blocks that start at or before it.
        new = sorted({sum(1 for g in groups if min(g) <= i - 1) for i in old})
        super().install(blocks, groups)
        cfg.stage_names = ["stem"] + [f"stage{j}" for j in range(1, len(blocks) + 1)]
        cfg.set_output_features_output_indices(out_features=None, out_indices=new)

    def intermediate_size(self) -> int:
        return int(self.config.hidden_size * self.config.mlp_ratio)  # how Dinov2MLP sizes fc1
