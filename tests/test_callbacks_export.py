"""ExportCallback: refuses an occupied output before any work; the report and the atomic write."""

import shutil
import time

import pytest
from lightning_helpers import report, tiny_config, tiny_model_dir, write_config

import train
from flatten_lightning.export import OutputExistsError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def test_occupied_output_is_refused_at_setup(model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "keep.txt").write_text("mine")
    t0 = time.perf_counter()
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        train.main(["fit", "--config", str(write_config(tiny_config(model_dir, run), tmp_path / "cfg.yaml"))])
    assert time.perf_counter() - t0 < 30
    assert [p.name for p in (run / "model").iterdir()] == ["keep.txt"]


def test_report_without_lora_and_with_overwrite(model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "old.txt").write_text("old")
    (run / "model" / "compression_report.json").write_text("{}")  # an earlier export: --overwrite may replace it
    cfg = tiny_config(model_dir, run, lora=False, max_steps=2)
    export = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ExportCallback"))
    export["init_args"]["overwrite"] = True
    train.main(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))])
    r = report(run / "model")
    assert not (run / "model" / "old.txt").exists() and (run / "model" / "tokenizer.json").exists()
    assert r["lora"] is None and r["training"]["global_step"] == 2
    assert set(r["perplexity"]) == {"before_compression", "after_compression", "after_recovery"}
    assert r["data"]["calibration"]["tokens"] == 8 * 32 and r["data"]["validation"]["after_calibration_tokens"]
    assert r["timings_s"]["fit"] >= r["timings_s"]["compression"] > 0
    assert not list(run.glob(".model.tmp-*"))  # the atomic write left no temporary directory


def test_overwrite_refuses_an_output_holding_the_calibration_file(model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(model_dir, run, lora=False, max_steps=2)
    calib = run / "model" / "calib.txt"
    calib.parent.mkdir(parents=True)
    shutil.copy(cfg["data"]["calib_file"], calib)
    (run / "model" / "compression_report.json").write_text("{}")
    cfg["data"]["calib_file"] = str(calib)
    next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ExportCallback"))["init_args"]["overwrite"] = True
    with pytest.raises(OutputExistsError, match=f"contains {calib}, an input of this run"):
        train.main(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))])
    assert calib.is_file()
