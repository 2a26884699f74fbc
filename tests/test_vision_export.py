"""A compressed DINOv2 backbone and its saliency decoder export to one directory that reloads both."""

import json

import pytest
import torch
from transformers import AutoModel
from vision_helpers import make_tiny_vision, pixels

from flatten_lightning.compress import CompressConfig, flatten_gpt
from flatten_lightning.export import OutputExistsError
from flatten_lightning.vision.decoder import SaliencyDecoder
from flatten_lightning.vision.export import save_vision_compressed
from flatten_lightning.vision.sources import load_vision_model


def tiny_decoder() -> SaliencyDecoder:
    torch.manual_seed(0)
    decoder = SaliencyDecoder((24, 8, 6, 4), patch_size=4)
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 0.5)
    return decoder.to(torch.float64).eval()


def test_compressed_saliency_model_round_trip(tmp_path):
    backbone, decoder = make_tiny_vision("dinov2"), tiny_decoder()
    plan = flatten_gpt(backbone, pixels(n=24, seed=2), CompressConfig(3, batch_size=8), progress=False)
    out = save_vision_compressed(backbone, decoder, tmp_path / "model", {"plan": plan.to_dict()})
    loaded, loaded_decoder = load_vision_model(str(out), dtype=torch.float64)
    plain = AutoModel.from_pretrained(out, dtype=torch.float64).eval()  # no code of ours for the backbone
    x = pixels(n=2, seed=3)
    with torch.no_grad():
        tokens = backbone(pixel_values=x).last_hidden_state
        saliency = decoder(tokens, (16, 16))
        assert loaded.config.num_hidden_layers == plain.config.num_hidden_layers == 3
        assert torch.allclose(plain(pixel_values=x).last_hidden_state, tokens, atol=1e-13, rtol=0)
        assert torch.allclose(loaded_decoder(loaded(pixel_values=x).last_hidden_state, (16, 16)), saliency, atol=1e-13, rtol=0)
    assert json.loads((out / "compression_report.json").read_text())["plan"]["groups"] == plan.groups


def test_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        save_vision_compressed(make_tiny_vision("dinov2"), None, tmp_path, {})
    assert (tmp_path / "keep.txt").read_text() == "not ours"
