"""Export -> reload in a fresh process with plain transformers: equal logits, working generate()."""

import errno
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny

from flatten_lightning import export
from flatten_lightning.compress import CompressConfig, flatten_gpt
from flatten_lightning.export import (
    REPORT_NAME,
    NonFiniteModelError,
    OutputExistsError,
    OutputLocationError,
    check_output_dir,
    save_compressed,
)

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float64).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = m(input_ids=ids).logits
    cached = m.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = m.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
torch.save({"logits": logits, "cached": cached, "uncached": uncached, "layers": m.config.num_hidden_layers,
            "layer_idx": [l.self_attn.layer_idx for l in m.model.layers]}, sys.argv[3])
"""


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "phi3"])
def test_export_reloads_in_fresh_process(kind, calib_ids, tmp_path):
    model = make_tiny(kind)
    plan = flatten_gpt(model, calib_ids, CompressConfig(4), progress=False)
    out = save_compressed(model, None, tmp_path / "model", {"plan": plan.to_dict()})
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["plan"]["groups"] == plan.groups
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and "quantization_config" not in cfg
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 4
    ids = calib_ids[:2, :12]
    subprocess.run([sys.executable, "-c", RELOAD, str(out), json.dumps(ids.tolist()), str(tmp_path / "r.pt")], check=True)
    r = torch.load(tmp_path / "r.pt")
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ours_gen = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert r["layers"] == 4 and r["layer_idx"] == [0, 1, 2, 3]
    assert torch.allclose(r["logits"], ours, atol=1e-10)
    assert torch.equal(r["cached"], r["uncached"]) and torch.equal(r["cached"], ours_gen)
    assert r["cached"].shape[1] == 13


def test_tied_embeddings_stay_tied(calib_ids, tmp_path):
    model = make_tiny("llama")  # tie_word_embeddings=True
    flatten_gpt(model, calib_ids, CompressConfig(4), progress=False)
    out = save_compressed(model, None, tmp_path / "m", {})
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_refuses_non_empty_output_dir_unless_overwrite(tmp_path):
    model = make_tiny("llama", num_hidden_layers=2)
    out = tmp_path / "m"
    save_compressed(model, None, out, {"x": 1})
    (out / "extra.txt").write_text("ours to replace")
    with pytest.raises(OutputExistsError, match="exists and is not empty.*--overwrite"):
        save_compressed(model, None, out, {"x": 2})
    assert json.loads((out / REPORT_NAME).read_text()) == {"x": 1}
    save_compressed(model, None, out, {"x": 2}, overwrite=True)  # an earlier export: replaced
    assert not (out / "extra.txt").exists() and json.loads((out / REPORT_NAME).read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directories left behind


def test_overwrite_never_replaces_a_directory_that_is_not_an_export(tmp_path):
    model = make_tiny("llama", num_hidden_layers=2)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match=f"{out} is not an earlier export.*Fix"):
        save_compressed(model, None, out, {}, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("inside", ["model/config.json", "calib.txt"])
def test_overwrite_never_replaces_a_directory_holding_an_input(tmp_path, inside):
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / REPORT_NAME).write_text("{}")  # even an earlier export of ours
    (out / inside).write_text("input")
    with pytest.raises(OutputExistsError, match=f"contains {out / inside}, an input of this run"):
        check_output_dir(out, overwrite=True, inputs=[str(tmp_path / "elsewhere.txt"), str(out / inside)])
    assert (out / inside).read_text() == "input"


def test_a_file_is_never_replaced_by_a_model_directory(tmp_path):
    (tmp_path / "f").write_text("data")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_output_dir(tmp_path / "f", overwrite=True)


def test_unwritable_output_location_is_refused(tmp_path):
    (tmp_path / "f").write_text("data")
    with pytest.raises(OutputLocationError, match=f"output {tmp_path / 'f' / 'sub' / 'out'} cannot be created"):
        check_output_dir(tmp_path / "f" / "sub" / "out", overwrite=False)


def test_low_free_space_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 99, 1))
    check_output_dir(tmp_path / "out", overwrite=False, needed_bytes=10**9)
    assert "only 0.00 GB free" in caplog.text and "1.00 GB" in caplog.text


def test_non_finite_model_is_not_exported(tmp_path):
    model = make_tiny("llama", num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteModelError, match="model.layers.1.mlp.up_proj.weight.*nothing was exported"):
        save_compressed(model, None, tmp_path / "m", {})
    assert list(tmp_path.iterdir()) == []


def test_full_disk_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    model = make_tiny("llama", num_hidden_layers=2)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(OSError, match=f"writing {tmp_path / 'm'} failed \\(No space left on device\\).*partial copy removed"):
        save_compressed(model, None, tmp_path / "m", {})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = make_tiny("llama", num_hidden_layers=2)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(model, None, tmp_path / "m", {})
    assert list(tmp_path.iterdir()) == []
