"""Export -> reload in a fresh process with plain transformers: equal logits, working generate()."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny

from flatten_lightning.compress import CompressConfig, flatten_gpt
from flatten_lightning.export import REPORT_NAME, OutputExistsError, save_compressed

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
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="exists and is not empty.*--overwrite"):
        save_compressed(model, None, out, {})
    assert (out / "keep.txt").read_text() == "user data"
    save_compressed(model, None, out, {"x": 1}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / REPORT_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directories left behind


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = make_tiny("llama", num_hidden_layers=2)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(model, None, tmp_path / "m", {})
    assert list(tmp_path.iterdir()) == []
