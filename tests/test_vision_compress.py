"""flatten-compress --calib-images: a tiny DINOv2 + decoder compressed end to end, bad input caught early."""

import json
import os

import pytest
import torch
from conftest import DATA
from transformers import AutoModel
from vision_helpers import make_tiny_vision

from flatten_lightning.cli import main
from flatten_lightning.vision.decoder import SaliencyDecoder, save_decoder
from flatten_lightning.vision.sources import load_vision_model

IMAGES = os.path.join(DATA, "imagenet-sample")


@pytest.fixture()
def tiny_saliency_dir(tmp_path):
    """A 5-block DINOv2 with patch 14 (224 px -> 16 x 16 tokens) and a saliency decoder, saved as a source."""
    model = make_tiny_vision("dinov2", patch_size=14, image_size=28).to(torch.float32)
    model.save_pretrained(tmp_path / "src")
    save_decoder(SaliencyDecoder((24, 8, 6, 4), patch_size=14).eval(), tmp_path / "src")
    return tmp_path / "src"


def test_images_end_to_end(tiny_saliency_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_saliency_dir), "--target-layers", "3", "--calib-images", IMAGES, "--calib-samples", "4"]
    assert main([*argv, "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert (report["original_layers"], report["layers"]) == (5, 3) and report["calibration"]["samples"] == 4
    assert len(report["stages"][0]["record"]["groups"]) == 3 and report["params"]["compressed"] < report["params"]["dense"]
    assert AutoModel.from_pretrained(out).config.num_hidden_layers == 3
    backbone, decoder = load_vision_model(str(out))
    with torch.no_grad():
        saliency = decoder(backbone(pixel_values=torch.randn(1, 3, 224, 224)).last_hidden_state, (224, 224))
    assert saliency.shape == (1, 1, 224, 224)


def test_sleb_by_feature_disagreement_end_to_end(tiny_saliency_dir, tmp_path):
    argv = ["--model", str(tiny_saliency_dir), "--target-layers", "3", "--calib-images", IMAGES, "--calib-samples", "3"]
    assert main([*argv, "--method", "sleb", "--score-windows", "2", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    record = json.loads((tmp_path / "s" / "compression_report.json").read_text())["stages"][0]["record"]
    assert record["scored_by"] == "FeatureDisagreement" and len(record["removed"]) == 2
    assert all(0 <= v <= 2 for step in record["steps"] for v in step["scores"].values())  # 1 - cos
    assert AutoModel.from_pretrained(tmp_path / "s").config.num_hidden_layers == 3


def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_perplexity_methods_refused_before_loading(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "nowhere"), "--target-layers", "3", "--calib-images", IMAGES, "--out", str(tmp_path / "o")]
    err = _err(capsys, [*argv, "--method", "blockpruner"])
    assert err.startswith("error: --method blockpruner scores by calibration perplexity") and "nowhere" not in err
    assert "--eval-windows measures perplexity" in _err(capsys, [*argv, "--eval-windows", "2"])


def test_missing_image_folder_is_named(tmp_path, capsys):
    argv = ["--target-layers", "3", "--calib-images", str(tmp_path / "pics"), "--out", str(tmp_path / "o")]
    assert "error: image folder" in _err(capsys, argv) and not (tmp_path / "o").exists()


def test_calibration_file_and_images_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--target-layers", "3", "--calib-images", IMAGES, "--calib-file", "x.txt", "--out", str(tmp_path / "o")])
    assert "not allowed with argument" in capsys.readouterr().err
