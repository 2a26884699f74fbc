"""Compression and label-free recovery of a vision backbone in the Lightning pipeline (tiny DINOv2, CPU):
FlattenCallback on calibration images, feature distillation from the dense backbone (full or LoRA),
export with the saliency decoder, and resume from a checkpoint into the compressed (and adapted) structure."""

import csv
import os

import pytest
import torch
from conftest import DATA
from lightning_helpers import RecordSteps, exported_state, report, tiny_config, write_config
from transformers import AutoModel
from vision_helpers import make_tiny_vision

from flatten_lightning.lightning import fit_images
from flatten_lightning.lightning.image_datamodule import ImageDataModule
from flatten_lightning.vision.decoder import SaliencyDecoder, save_decoder
from flatten_lightning.vision.images import list_images, load_images
from flatten_lightning.vision.sources import load_vision_model

IMAGES = os.path.join(DATA, "imagenet-sample")
SMALL = {"resize": 64, "crop": 56}  # 4 x 4 patches of 14 px: seconds on a CPU


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 5-block DINOv2 (patch 14) with a saliency decoder, saved as a vision source."""
    path = tmp_path_factory.mktemp("tiny") / "dinov2"
    # Weights of std 0.3, not 0.02: blocks that barely touch the residual stream would compress almost exactly.
    model = make_tiny_vision("dinov2", patch_size=14, image_size=28, initializer_range=0.3).to(torch.float32)
    model.save_pretrained(path)
    save_decoder(SaliencyDecoder((24, 8, 6, 4), patch_size=14).eval(), path)
    return path


def config(source, run, *, max_steps: int, lora: bool, lr: float = 1e-3, every_n_steps: int | None = None, out: str = "model") -> dict:
    """The tiny LLM run config (lightning_helpers.tiny_config) with this module's model, images and no perplexity."""
    cfg = tiny_config(source, run, target_layers=3, max_steps=max_steps, lora=lora, lr=lr, every_n_steps=every_n_steps)
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"] in ("callbacks.FlattenCallback", "callbacks.ExportCallback"):
            cb["init_args"]["eval_perplexity"] = False
        if cb["class_path"] == "callbacks.ExportCallback":
            cb["init_args"]["out_dir"] = str(run / out)
    cfg["trainer"]["val_check_interval"] = max_steps  # one validation, at the end
    cfg["model"] = {"source": str(source), "lr": lr, "distill_loss": "cosine", "seed": 0}
    cfg["data"] = {"images": IMAGES, "calib_samples": 4, "val_images": 2, "train_max_images": 8, "batch_size": 4, **SMALL}
    return cfg


def _fit(cfg: dict, path, *extra: str):
    return fit_images.main(["fit", "--config", str(write_config(cfg, path)), *extra])


def _column(run, name: str) -> list[float]:
    rows = list(csv.DictReader(open(next((run / "logs").glob("version_*/metrics.csv")))))
    return [float(r[name]) for r in rows if r.get(name)]


def test_compress_distil_and_export(source, tmp_path):
    cli = _fit(config(source, tmp_path, max_steps=12, lora=False), tmp_path / "c.yaml")
    loss = _column(tmp_path, "train_loss")
    # An epoch is 2 batches covering all 8 training images: the loss over the same images, first epoch vs last.
    assert len(loss) == 12 and sum(loss[-2:]) < 0.6 * sum(loss[:2])
    out = tmp_path / "model"
    r = report(out)
    assert (r["original_layers"], r["layers"]) == (5, 3) and r["training"]["distill_loss"] == "cosine"
    assert r["calibration"]["samples"] == 4 and r["perplexity"]["after_recovery"] is None
    backbone, decoder = load_vision_model(str(out))
    assert decoder is not None and AutoModel.from_pretrained(out).config.num_hidden_layers == 3
    x = load_images(list_images(IMAGES)[-2:], **SMALL)
    with torch.no_grad():
        assert torch.allclose(backbone(pixel_values=x).last_hidden_state, cli.model(x), atol=1e-5)  # the export is the trained model
    start, end = _column(tmp_path, "start_distill"), _column(tmp_path, "val_distill")
    assert len(start) == len(end) == 1 and end[0] < start[0]  # held-out images: recovery improved the agreement
    assert _column(tmp_path, "start_cls_cos")[0] < _column(tmp_path, "val_cls_cos")[0] <= 1


def test_resume_rebuilds_compressed_lora_structure_and_matches_an_uninterrupted_run(source, tmp_path):
    full = tmp_path / "full"
    _fit(config(source, full, max_steps=6, lora=True), tmp_path / "full.yaml")
    part = tmp_path / "part"
    _fit(config(source, part, max_steps=3, lora=True, every_n_steps=3, out="first"), tmp_path / "part.yaml")  # stops at step 3
    ckpt = part / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"] == 3
    cfg = config(source, part, max_steps=6, lora=True)
    cfg["trainer"]["callbacks"].append({"class_path": "lightning_helpers.RecordSteps"})
    cli = _fit(cfg, tmp_path / "resume.yaml", "--ckpt_path", str(ckpt))
    steps = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RecordSteps))
    assert (steps.start, steps.steps) == (3, 3) and report(part / "model")["lora"] is not None  # resumed, not restarted
    a, b = exported_state(full / "model"), exported_state(part / "model")
    assert a.keys() == b.keys() and len([k for k in a if ".layer." in k and k.endswith("fc1.weight")]) == 3
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_perplexity_is_refused_before_any_work(source, tmp_path):
    cfg = config(source, tmp_path, max_steps=2, lora=False)
    cfg["trainer"]["callbacks"][0]["init_args"]["eval_perplexity"] = True
    with pytest.raises(ValueError, match="FlattenCallback.eval_perplexity: a vision backbone has no perplexity"):
        _fit(cfg, tmp_path / "p.yaml")
    assert not (tmp_path / "model").exists()


def test_image_layout_keeps_validation_out_of_training():
    dm = ImageDataModule(IMAGES, calib_samples=3, val_images=2, train_max_images=2, batch_size=1, **SMALL)
    dm.prepare()
    paths = list_images(IMAGES)
    assert torch.equal(dm.calibration, load_images(paths[:3], **SMALL))  # beyond the 2 training images too
    assert torch.equal(dm.train, load_images(paths[:2], **SMALL)) and torch.equal(dm.validation, load_images(paths[-2:], **SMALL))
    assert torch.equal(torch.cat([dm.calibration_shard(0, 2), dm.calibration_shard(1, 2)]), dm.calibration[[0, 2, 1]])
    with pytest.raises(ValueError, match="too few for 400 calibration \\+ 101 validation"):
        ImageDataModule(IMAGES, calib_samples=400, val_images=101)
