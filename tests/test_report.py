"""One report schema for the compression command and the Lightning export; plans stored once in checkpoints."""

import json

import pytest
import torch
from conftest import WIKITEXT
from lightning_helpers import report, tiny_config, tiny_model_dir, write_config

import train
from flatten_lightning.cli import main
from flatten_lightning.report import build_report, plans_of

SCHEMA_KEYS = {"schema", "method", "source", "original_layers", "layers", "stages", "calibration", "params", "perplexity", "timings_s"}
STAGE_KEYS = {"step", "target_layers", "layers_before", "seconds", "params", "ppl", "record"}


def test_sections_cannot_overwrite_schema_keys():
    with pytest.raises(ValueError, match="overwrite"):
        build_report(
            method="flatten",
            source="x",
            original_layers=2,
            layers=1,
            stages=[],
            calibration={},
            params={},
            perplexity={},
            timings_s={},
            schema=2,
        )


def test_cli_and_lightning_reports_share_the_schema(tiny_dir, tmp_path):
    cli_out = tmp_path / "cli"
    argv = ["--model", str(tiny_dir), "--target-layers", "4", "--calib-file", WIKITEXT, "--calib-samples", "4", "--calib-seqlen", "32"]
    assert main([*argv, "--out", str(cli_out), "--quiet"]) == 0
    a = json.loads((cli_out / "compression_report.json").read_text())
    run = tmp_path / "run"
    model_dir = tiny_model_dir(tmp_path / "tiny")
    train.main(["fit", "--config", str(write_config(tiny_config(model_dir, run, max_steps=2), tmp_path / "cfg.yaml"))])
    b = report(run / "model")
    for r in (a, b):
        assert SCHEMA_KEYS <= set(r) and r["schema"] == 1
        assert all(set(s) == STAGE_KEYS for s in r["stages"])
        assert set(r["perplexity"]) >= {"before_compression", "after_compression"}
        assert {"dense", "compressed"} <= set(r["params"])
    assert [len(p["groups"]) for p in plans_of(a)] == [len(p["groups"]) for p in plans_of(b)] == [4]


def test_a_checkpoint_stores_each_plan_once(tmp_path):
    run = tmp_path / "run"
    model_dir = tiny_model_dir(tmp_path / "tiny")
    cfg = tiny_config(model_dir, run, [{"step": 0, "target_layers": 5}, {"step": 2, "target_layers": 4}], max_steps=4, every_n_steps=4)
    train.main(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    text = json.dumps({k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}, default=str)
    assert len(ckpt["flatten_lightning"]["plans"]) == 2
    assert text.count('"kept_channels"') == 2  # one per stage: the module's record, not the callback's too
