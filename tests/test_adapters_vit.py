"""ViT, DeiT and DINOv2 adapters on tiny random models (float64): the branches are the blocks' own
computation, LayerNorm (scale and shift) and LayerScale fold so that flattening is exact, plain
multi-head pruning is wired right, and a compressed model exports to a plain transformers directory."""

import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification
from vision_helpers import VISION_KINDS, features, make_tiny_vision, pixels

from flatten_lightning import prune
from flatten_lightning.adapters import Affine, UnsupportedArchitectureError, get_adapter
from flatten_lightning.adapters.deit import DeiTAdapter
from flatten_lightning.adapters.dinov2 import Dinov2Adapter
from flatten_lightning.adapters.vit import ViTAdapter
from flatten_lightning.compress import CompressConfig, flatten_gpt
from flatten_lightning.flatten import flatten_blocks


@pytest.fixture(params=VISION_KINDS)
def vision(request):
    return make_tiny_vision(request.param)


def test_each_family_gets_its_adapter():
    expected = {"vit": ViTAdapter, "vit-classifier": ViTAdapter, "deit": DeiTAdapter, "dinov2": Dinov2Adapter}
    for kind, cls in expected.items():
        ad = get_adapter(make_tiny_vision(kind))
        assert type(ad) is cls
        assert (ad.layout().n_heads, ad.layout().n_kv_heads, ad.layout().head_dim) == (4, 4, 6)
    assert get_adapter(make_tiny_vision("vit")).auto_class == "AutoModel"
    assert get_adapter(make_tiny_vision("vit-classifier")).auto_class == "AutoModelForImageClassification"


def test_dinov2_swiglu_ffn_refused():
    with pytest.raises(UnsupportedArchitectureError, match="SwiGLU"):
        get_adapter(make_tiny_vision("dinov2", use_swiglu_ffn=True))


@torch.no_grad()
def test_branches_are_the_blocks_own_computation(vision):
    ad = get_adapter(vision)
    h = ad.embed(pixels())
    for block in ad.blocks()[:2]:
        u = h + ad.attention(block, h, {})
        assert torch.equal(ad.run_block(block, h, {}), u + ad.mlp(block, u))
        h = ad.run_block(block, h, {})


@torch.no_grad()
def test_embed_blocks_and_final_norm_reproduce_the_model(vision):
    ad = get_adapter(vision)
    x = pixels()
    h = ad.embed(x)
    tokens = 2 + 16 if vision.config.model_type == "deit" else 1 + 16  # DeiT: CLS + distillation token
    assert h.shape == (3, tokens, 24)
    for block in ad.blocks():
        h = ad.run_block(block, h, {})
    assert torch.allclose(ad.final_norm()(h), features(vision, x), atol=1e-12)


@torch.no_grad()
def test_read_write_round_trip_keeps_the_block(vision):
    ad = get_adapter(vision)
    h = ad.embed(pixels())
    block = ad.blocks()[1]
    before = ad.run_block(block, h, {})
    ad.write(block, ad.read(block))
    assert torch.allclose(ad.run_block(block, h, {}), before, atol=1e-12)  # LayerScale folded: rounding only
    if vision.config.model_type == "dinov2":
        assert torch.equal(block.layer_scale1.lambda1, torch.ones(24, dtype=torch.float64))
    assert ad.is_plain()


@torch.no_grad()
def test_flattened_block_equals_parallel_form(vision):
    """u = h + sum_l A_l(h), out = u + sum_l M_l(u), with LayerNorm shifts and LayerScale folded exactly."""
    ad = get_adapter(vision)
    blocks = list(ad.blocks())
    h = ad.embed(pixels()) + 0.5 * torch.randn(3, 1, 24, dtype=torch.float64)  # a less trivial residual stream
    for group in (blocks[1:3], blocks[2:5]):
        flat = flatten_blocks(ad, group)
        u = h + sum(ad.attention(b, h, {}) for b in group)
        parallel = u + sum(ad.mlp(b, u) for b in group)
        got = ad.run_block(flat, h, {})
        assert (got - parallel).abs().max() <= 1e-12
        seq = h
        for b in group:
            seq = ad.run_block(b, seq, {})
        assert (got - seq).abs().max() > 1e-3  # parallel is not sequential: the test can fail
        w = ad.read(flat)
        assert ad.heads_of(w) == (4 * len(group), 4 * len(group))
        assert w.up.weight.shape[0] == ad.intermediate_size() * len(group)
        assert torch.equal(w.attn_norm.shift, torch.zeros(24, dtype=torch.float64))


@torch.no_grad()
def test_kept_heads_equal_flattened_with_dropped_heads_zeroed(vision):
    """Plain multi-head (n_rep = 1): keeping heads = zeroing the o columns of the others; o bias kept."""
    ad = get_adapter(vision)
    lay = ad.layout()
    flat, ref = (flatten_blocks(ad, list(ad.blocks()[:2])) for _ in range(2))
    h = ad.embed(pixels())
    heads = torch.tensor([0, 3, 5, 6])
    cols = prune.unit_rows(heads, lay.head_dim)
    w = ad.read(ref)
    mask = torch.zeros(w.o.weight.shape[1], dtype=torch.float64)
    mask[cols] = 1
    ad.write(ref, w.with_(o=Affine(w.o.weight * mask, w.o.bias)))
    ad.write(flat, prune.keep_heads(ad.read(flat), heads, lay.n_rep, lay.head_dim))
    assert ad.heads_of(ad.read(flat)) == (4, 4)
    assert torch.allclose(ad.attention(flat, h, {}), ad.attention(ref, h, {}), atol=1e-12)


@torch.no_grad()
def test_kept_channels_equal_flattened_with_dropped_channels_zeroed(vision):
    """MLP channel pruning keeps fc1's bias rows with their channels (GELU(b) of a dropped channel is not 0)."""
    ad = get_adapter(vision)
    flat, ref = (flatten_blocks(ad, list(ad.blocks()[1:3])) for _ in range(2))
    u = ad.embed(pixels())
    channels = torch.arange(0, 2 * ad.intermediate_size(), 3)
    w = ad.read(ref)
    mask = torch.zeros(w.down.weight.shape[1], dtype=torch.float64)
    mask[channels] = 1
    ad.write(ref, w.with_(down=Affine(w.down.weight * mask, w.down.bias)))
    ad.write(flat, prune.keep_channels(ad.read(flat), channels))
    assert ad.down_module(flat).in_features == len(channels)
    assert torch.allclose(ad.mlp(flat, u), ad.mlp(ref, u), atol=1e-12)


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_compressed_model_exports_to_a_plain_transformers_directory(kind, tmp_path):
    model = make_tiny_vision(kind)
    calib = pixels(n=24, seed=2)
    plan = flatten_gpt(model, calib, CompressConfig(3, batch_size=8), progress=False)
    assert len(plan.steps) == 2 and model.config.num_hidden_layers == 3
    assert get_adapter(model).is_plain()
    model.save_pretrained(tmp_path)
    auto = AutoModelForImageClassification if kind == "vit-classifier" else AutoModel
    loaded = auto.from_pretrained(tmp_path, dtype=torch.float64).eval()  # no code of ours
    assert type(loaded) is type(model) and len(get_adapter(loaded).blocks()) == 3
    x = pixels(n=2, seed=3)
    with torch.no_grad():
        # float64 rounding only: an untouched model differs by ~4e-16 after save/load too
        assert torch.allclose(features(loaded, x), features(model, x), atol=1e-13, rtol=0)
        if kind == "vit-classifier":
            assert torch.allclose(loaded(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-13, rtol=0)


def test_dinov2_backbone_stages_follow_the_compressed_depth():
    model = make_tiny_vision("dinov2", out_indices=[2, 5])  # the output of original blocks 1 and 4 (the last)
    ad = get_adapter(model)
    ad.install(list(ad.blocks())[:3], [[0], [1, 2], [3, 4]])
    assert model.config.stage_names == ["stem", "stage1", "stage2", "stage3"]
    assert model.config.out_indices == [2, 3]  # original block 1 now sits in new block 2 (ends there), block 4 in 3
    assert model.config.out_features == ["stage2", "stage3"]


def test_dinov2_stage_of_a_removed_block_moves_to_the_last_block_before_it():
    model = make_tiny_vision("dinov2", out_indices=[3, 5])  # outputs of original blocks 2 and 4 (the last)
    ad = get_adapter(model)
    blocks = list(ad.blocks())
    ad.install([blocks[0], blocks[1], blocks[3]], [[0], [1], [3]])  # blocks 2 and 4 removed (SLEB, ShortGPT)
    assert model.config.out_indices == [2, 3]  # block 2's output is now block 1's (stage 2); block 4's is block 3's (stage 3)
