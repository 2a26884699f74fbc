"""train.py (LightningCLI) and configs/: every ready config parses, every key is commented, unknown keys fail."""

import glob
import os
import re

import pytest
import torch
import yaml
from conftest import ROOT
from lightning_helpers import report, run_train, tiny_config, tiny_model_dir, write_config

import train
from flatten_lightning.lightning import fit_images
from flatten_lightning.lightning.fit import console_main

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def test_the_ready_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert "smollm2_demo.yaml" in names
    for family in ("llama2_7b", "llama3_8b", "mistral_7b", "qwen1.5_7b"):
        assert {f"{family}_1gpu.yaml", f"{family}_8gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_with_the_cli(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths are relative to the checkout
    vision = "images" in yaml.safe_load(open(path, encoding="utf-8"))["data"]  # a vision backbone's config (fit_images)
    with pytest.raises(SystemExit) as e:
        (fit_images.main if vision else train.main)(["fit", "--config", path, "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["source"] and printed["data"]["images" if vision else "calib_file"]
    classes = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert any(c.endswith("FlattenCallback") for c in classes) and any(c.endswith("ExportCallback") for c in classes)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_key_has_a_comment(path):
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        code = line.split("#", 1)[0]
        if re.match(r"^\s*(- )?[A-Za-z_][\w.]*:", code) and "#" not in line:
            pytest.fail(f"{os.path.basename(path)}:{n} has no comment: {line.rstrip()}")


def test_unknown_config_key_is_named(model_dir, tmp_path, capsys):
    cfg = tiny_config(model_dir, tmp_path / "run")
    cfg["model"]["learning_rte"] = 0.1
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rte" in err
    assert not (tmp_path / "run" / "model").exists()


def test_unknown_callback_argument_is_named(model_dir, tmp_path, capsys):
    cfg = tiny_config(model_dir, tmp_path / "run")
    cfg["trainer"]["callbacks"][0]["init_args"]["target_layer"] = 3
    with pytest.raises(SystemExit):
        train.main(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))])
    assert "target_layer" in capsys.readouterr().err


def test_train_py_runs_as_a_script(model_dir, tmp_path):
    cfg = write_config(tiny_config(model_dir, tmp_path / "run", max_steps=2), tmp_path / "cfg.yaml")
    proc = run_train(["fit", "--config", str(cfg)], cwd=str(tmp_path))  # from another directory too
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "perplexity before compression" in out and "after recovery" in out
    assert report(tmp_path / "run" / "model")["layers"] == 4


@pytest.mark.slow
def test_smollm2_short_fit(tmp_path):
    """The real embedded model through the CLI: 30 -> 29 layers, 2 LoRA steps, export, plain reload."""
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "smollm2_demo.yaml")))
    cfg["trainer"].update(max_steps=2, val_check_interval=2, default_root_dir=str(tmp_path))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cbs = cfg["trainer"]["callbacks"]
    cbs[0]["init_args"].update(target_layers=29, progress=False)
    cbs[2]["init_args"]["out_dir"] = str(tmp_path / "model")
    cbs[3]["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    cfg["data"].update(calib_samples=2, calib_seqlen=128, val_windows=2, val_seqlen=256, train_seqlen=64, train_max_windows=8, batch_size=2)
    proc = run_train(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = report(tmp_path / "model")
    p = r["perplexity"]
    assert r["original_layers"] == 30 and r["layers"] == 29
    assert p["before_compression"] < p["after_compression"] < 1.5 * p["before_compression"], p
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.num_hidden_layers == 29


def _console(args: list[str], capsys) -> tuple[int, str]:
    """``train.py <args>`` in-process through the console entry point: (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        console_main(args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("lr", [1e30, float("inf")])
def test_divergence_exits_non_zero_exports_nothing_and_keeps_finite_checkpoints(model_dir, tmp_path, capsys, lr):
    run = tmp_path / "run"
    cfg = tiny_config(model_dir, run, lr=lr, max_steps=6, every_n_steps=1, lora=False)
    code, err = _console(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))], capsys)
    assert code == 1
    assert "error: training diverged at step" in err and "Nothing was exported" in err
    assert not (run / "model").exists()
    for ckpt in run.glob("checkpoints/*.ckpt"):  # whatever ModelCheckpoint saved holds finite weights
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), ckpt
    if lr == float("inf"):  # the first step's update is already non-finite: nothing may be saved
        assert not list(run.glob("checkpoints/*.ckpt"))


def test_bad_callback_argument_is_the_first_line(model_dir, tmp_path, capsys):
    cfg = tiny_config(model_dir, tmp_path / "run")
    cfg["trainer"]["callbacks"][0]["init_args"]["target_layers"] = "abc"
    code, err = _console(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))], capsys)
    assert code == 2
    first = next(line for line in err.splitlines() if not line.startswith(os.path.dirname(torch.__file__)[:-5]))  # skip warnings
    assert first.startswith("error: callbacks.FlattenCallback: init argument target_layers='abc': expected int")


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"PK\x03\x04 truncated", "cannot be read"), ("foreign", "was not written by a flatten-train run")],
    ids=["missing", "truncated", "foreign"],
)
def test_unusable_checkpoint_is_one_error_line(model_dir, tmp_path, capsys, content, message):
    ckpt = tmp_path / "last.ckpt"
    if content == "foreign":
        torch.save({"state_dict": {}}, ckpt)
    elif content is not None:
        ckpt.write_bytes(content)
    cfg = write_config(tiny_config(model_dir, tmp_path / "run"), tmp_path / "cfg.yaml")
    code, err = _console(["fit", "--config", str(cfg), "--ckpt_path", str(ckpt)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: --ckpt_path {ckpt} {message}")
    assert not (tmp_path / "run" / "model").exists()


def test_windows_longer_than_the_model_positions_are_refused(model_dir, tmp_path, capsys):
    cfg = tiny_config(model_dir, tmp_path / "run")
    cfg["data"]["val_seqlen"] = 512
    code, err = _console(["fit", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))], capsys)
    assert code == 2
    assert "error: data.val_seqlen 512 is above the model's max_position_embeddings 256. Fix: pass data.val_seqlen 256 or less." in err
