"""The real embedded model end to end: SmolLM2-135M (GGUF from PyPI) 30 -> 28, export, plain reload.

Kept to about two minutes on 2 CPU cores: 8 calibration windows of 512 tokens, 2 held-out windows of 512.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import WIKITEXT

from flatten_lightning.cli import main
from flatten_lightning.report import plans_of

RELOAD_PPL = r"""
import json, math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from flatten_lightning.data import held_out, read_text, tokenize
from flatten_lightning.perplexity import windows
out, text = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(out)
m = AutoModelForCausalLM.from_pretrained(out).eval()   # plain transformers, no code of ours in the model
ids = held_out(tokenize(tok, read_text(text)), 8, 512)
nll = n = 0
with torch.no_grad():
    for x in windows(ids, 512, 2):   # the same windows as the report, scored with a plain loop
        logits = m(input_ids=x[None]).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits.double(), x[1:], reduction="sum").item()
        n += 511
    gen = m.generate(tok("The capital of France is", return_tensors="pt").input_ids, max_new_tokens=6, do_sample=False)
print(json.dumps({"ppl": math.exp(nll / n), "layers": m.config.num_hidden_layers, "new_tokens": gen.shape[1]}))
"""


@pytest.mark.slow
def test_smollm2_compress_export_reload(tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "model"
    rc = main(
        [
            "--model",
            "smollm2",
            "--target-layers",
            "28",
            "--calib-file",
            WIKITEXT,
            "--calib-samples",
            "8",
            "--calib-seqlen",
            "512",
            "--out",
            str(out),
            "--eval-windows",
            "2",
            "--eval-seqlen",
            "512",
            "--quiet",
        ]
    )
    assert rc == 0
    report = json.loads((out / "compression_report.json").read_text())
    before, after = report["perplexity"]["before_compression"], report["perplexity"]["after_compression"]
    assert report["original_layers"] == 30 and report["layers"] == 28
    assert report["params"]["compressed"] < report["params"]["dense"]
    assert sorted(i for g in plans_of(report)[0]["groups"] for i in g) == list(range(30))
    # Stated bound: removing 2 of 30 blocks costs less than 30% perplexity on held-out text.
    assert math.isfinite(after) and before < after < 1.3 * before, (before, after)
    proc = subprocess.run([sys.executable, "-c", RELOAD_PPL, str(out), WIKITEXT], capture_output=True, text=True, check=True)
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reloaded["layers"] == 28 and reloaded["new_tokens"] > 5
    assert reloaded["ppl"] == pytest.approx(after, rel=1e-4)
