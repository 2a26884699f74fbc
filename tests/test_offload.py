"""Offloaded compression keeps one block on the compute device at a time, whatever the depth.

There is no second device in CI, so the compute device is ``cpu:0`` (a distinct ``torch.device`` from
the host's ``cpu``) and ``nn.Module.to`` is watched: a module moved to ``cpu:0`` is resident until it
is moved back. That is the only way weights reach the device under offload (``calibrate.on_device``);
a compression that moved the whole model, or forgot to move a block back, shows up as more than one
resident block and as a peak that grows with depth (the leak test below shows the check can fail).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from torch import nn

from flatten_lightning import calibrate
from flatten_lightning.compress import CompressConfig, flatten_gpt

COMPUTE = torch.device("cpu", 0)


class Residency:
    """Which modules sit on ``COMPUTE`` now, and the most decoder blocks / parameters there at once."""

    def __init__(self, blocks: set[type]) -> None:
        self.blocks = blocks
        self.resident: dict[int, nn.Module] = {}
        self.peak_blocks = 0
        self.peak_params = 0

    def moved(self, module: nn.Module, device: torch.device | None) -> None:
        if device is None:
            return
        if device == COMPUTE:
            self.resident[id(module)] = module
        else:
            self.resident.pop(id(module), None)
        mods = list(self.resident.values())
        self.peak_blocks = max(self.peak_blocks, sum(type(m) in self.blocks for m in mods))
        self.peak_params = max(self.peak_params, sum(p.numel() for m in mods for p in m.parameters()))


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    for a in (*args, kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
    return None


@pytest.fixture
def residency(monkeypatch) -> Residency:
    """Patch ``nn.Module.to`` to report every move to the tracker (blocks: the decoder layer classes)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    tracker = Residency({LlamaDecoderLayer})
    to = nn.Module.to

    def watched(module, *args, **kwargs):
        out = to(module, *args, **kwargs)
        tracker.moved(module, _device_of(args, kwargs))
        return out

    monkeypatch.setattr(nn.Module, "to", watched)
    return tracker


def block_params(model) -> int:
    return sum(p.numel() for p in model.model.layers[0].parameters())


def compress_offloaded(layers: int, steps: int = 2) -> tuple[nn.Module, object]:
    model = make_tiny("llama", dtype=torch.float32, num_hidden_layers=layers)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    plan = flatten_gpt(model, ids, CompressConfig(layers - steps, batch_size=2, offload=True), device=COMPUTE, progress=False)
    return model, plan


@pytest.mark.parametrize("layers", [4, 8])
def test_offload_keeps_one_block_on_the_device(residency, layers):
    model, plan = compress_offloaded(layers)
    assert len(plan.steps) == 2
    assert residency.peak_blocks == 1  # the flattened pair counts as one (double-width) block
    # At most the flattened pair's weights (two blocks) or the embeddings, never a second block beside them.
    emb = model.get_input_embeddings().weight.numel()
    assert block_params(model) <= residency.peak_params <= max(2 * block_params(model), emb)
    assert not [m for m in residency.resident.values() if any(True for _ in m.parameters())]  # all weights went back


def test_offload_peak_does_not_grow_with_depth(residency):
    compress_offloaded(4)
    shallow = residency.peak_params
    residency.peak_params = 0
    compress_offloaded(8)
    assert residency.peak_params == shallow


def test_the_residency_check_sees_a_block_left_on_the_device(residency, monkeypatch):
    """Control: an offload that forgets to move blocks back is caught (more blocks, growing peak)."""
    from contextlib import contextmanager

    @contextmanager
    def leaky(module, device, offload):
        if offload:
            module.to(device)
        yield module

    monkeypatch.setattr(calibrate, "on_device", leaky)
    monkeypatch.setattr("flatten_lightning.compress.on_device", leaky)
    compress_offloaded(4)
    four = residency.peak_params
    assert residency.peak_blocks > 1
    residency.peak_params = 0
    compress_offloaded(8)
    assert residency.peak_params > four


def test_offload_compresses_exactly_like_no_offload():
    """Moving blocks back and forth changes nothing: same plan, same weights."""
    model, plan = compress_offloaded(6)
    ref = make_tiny("llama", dtype=torch.float32, num_hidden_layers=6)
    ids = torch.randint(0, ref.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    ref_plan = flatten_gpt(ref, ids, CompressConfig(4, batch_size=2), device="cpu", progress=False)
    assert [(s.members, s.kept_kv_groups, s.kept_channels) for s in plan.steps] == [
        (s.members, s.kept_kv_groups, s.kept_channels) for s in ref_plan.steps
    ]
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
