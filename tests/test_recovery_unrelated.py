"""The unrelated-text recovery benchmark on a tiny model: what it measures is what it says it measures.

Step 0 is the export itself for every recipe; each later point is the library's held-out perplexity of
the model as trained so far (the last one equals the recovered model's); the recipes really train with
different losses; the training text never includes the evaluation text; bad settings fail before work.
"""

import json
import os
from dataclasses import asdict, replace

import pytest
from conftest import WIKITEXT
from lightning_helpers import tiny_model_dir

from benchmarks import recovery_unrelated as ru
from flatten_lightning import cli
from flatten_lightning.data import held_out, read_text, tokenize
from flatten_lightning.perplexity import perplexity


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> ru.Setup:
    root = tmp_path_factory.mktemp("recovery")
    model = tiny_model_dir(root / "dense")
    export = root / "export"
    argv = ["--model", str(model), "--target-layers", "4", "--calib-file", WIKITEXT, "--calib-samples", "4", "--calib-seqlen", "32"]
    assert cli.main([*argv, "--out", str(export), "--quiet"]) == 0
    return ru.Setup(
        str(export),
        str(model),
        calib_samples=4,
        calib_seqlen=32,
        eval_seqlen=64,
        eval_windows=2,
        seqlen=32,
        batch_size=2,
        steps=4,
        eval_every=2,
        lr=1e-2,
    )


def test_points_are_the_held_out_perplexity_of_the_model_as_trained(setup):
    points, module, reference = ru.recover(setup, "ce")
    assert [p["step"] for p in points] == [0, 2, 4] and [p["tokens"] for p in points] == [0, 128, 256]
    ids = held_out(tokenize(module.tokenizer, read_text(WIKITEXT)), 4, 32)  # after the calibration tokens
    # The recovered model (adapters merged at the end of fit) scores what the last point recorded.
    assert points[-1]["ppl"] == pytest.approx(perplexity(module.base_model, ids, 64, 2, progress=False).ppl, rel=1e-5)
    assert points[0]["ppl"] == reference["compressed"] != points[-1]["ppl"]
    assert reference["dense"] != reference["compressed"]
    # CE recipe: the optimised loss is the cross entropy itself.
    assert all(p["train_loss"] == pytest.approx(p["train_ce"], rel=1e-6) for p in points[1:])


def test_recipes_share_the_start_and_train_with_their_own_losses(setup, tmp_path):
    flags = {"steps": 4, "eval-every": 2, "batch-size": 2, "seqlen": 32, "lr": 0.01, "eval-windows": 2, "eval-seqlen": 64}
    flags |= {"calib-samples": 4, "calib-seqlen": 32, "model": setup.export, "source": setup.source, "out": tmp_path / "out"}
    flags |= {"lora-r": 4, "lora-alpha": 8}
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))] + ["--recipes", "ce,kd,hidden,hidden-token", "--dense-baseline"]
    results = ru.main(argv)
    assert results == json.loads((tmp_path / "out" / "results.json").read_text())
    lora = replace(setup.lora, r=4, alpha=8)
    want = asdict(replace(setup, dense_baseline=True)) | {"lora": lora.to_dict()}
    assert results["settings"] == json.loads(json.dumps(want))  # every flag reached its field
    # The dense baseline: the source trained with the first recipe starts at the dense perplexity and moves.
    base = results["dense_recovered"]
    assert base["recipe"] == "ce" and base["points"][0]["ppl"] == results["dense_ppl"] != base["points"][-1]["ppl"]
    assert base["points"][-1]["ppl"] not in {x["points"][-1]["ppl"] for x in results["recipes"].values()}
    r = results["recipes"]
    assert r["kd"]["losses"] == {"distill_alpha": 1.0, "distill_hidden": 0.0, "distill_hidden_norm": "global"}
    assert r["hidden"]["losses"] == {"distill_alpha": 0.0, "distill_hidden": 1.0, "distill_hidden_norm": "global"}
    assert r["hidden-token"]["losses"] == {"distill_alpha": 0.0, "distill_hidden": 1.0, "distill_hidden_norm": "token"}
    assert len({x["points"][0]["ppl"] for x in r.values()}) == 1  # the same export at step 0
    assert len({x["points"][-1]["ppl"] for x in r.values()}) == 4  # different losses, different models
    kd, hidden = r["kd"]["points"][-1], r["hidden"]["points"][-1]
    assert kd["train_loss"] != pytest.approx(kd["train_ce"], rel=1e-3)  # alpha 1: the KL, not the CE, is optimised
    assert hidden["train_loss"] > hidden["train_ce"]  # CE + a positive hidden-state term
    md = (tmp_path / "out" / "results.md").read_text()
    assert (
        "| kd | 1.0 | 0.0 |" in md
        and "| hidden-token | 0.0 | 1.0 (token) |" in md
        and "128 tok" in md
        and f"{results['dense_ppl']:.2f}" in md
        and "| dense source + ce | - | - |" in md
    )
    assert all(not os.path.samefile(f, WIKITEXT) for f in results["settings"]["train_files"])


def test_recovered_teacher_is_the_dense_source_after_ce_and_teaches_the_distilling_recipes(setup, tmp_path, capsys):
    both = replace(setup, teacher="recovered", dense_baseline=True, kd_alpha=1.0)
    results = ru.run(both, ["ce", "kd"], str(tmp_path / "out"))
    taught = results["teacher_recovered"]
    # The baseline asks for the same training as the teacher (ce first): the source is trained once, not twice.
    assert capsys.readouterr().out.count("dense source, recipe ce") == 1
    assert results["dense_recovered"] == taught
    # Stage one is the dense baseline's training: a separate baseline run gives the same curve.
    plain = ru.run(replace(both, teacher="dense"), ["ce", "kd"], str(tmp_path / "plain"))
    base = plain["dense_recovered"]
    assert taught["recipe"] == "ce" and [p["ppl"] for p in taught["points"]] == [p["ppl"] for p in base["points"]]
    assert taught["points"][0]["ppl"] == results["dense_ppl"] != taught["points"][-1]["ppl"]
    # ce learns from no teacher, so it is the same run either way; kd learns from the recovered model, not the source.
    r, p = results["recipes"], plain["recipes"]
    assert [x["ppl"] for x in r["ce"]["points"]] == [x["ppl"] for x in p["ce"]["points"]]
    assert r["kd"]["points"][0]["ppl"] == p["kd"]["points"][0]["ppl"]
    assert r["kd"]["points"][-1]["ppl"] != p["kd"]["points"][-1]["ppl"]
    assert "| teacher: dense source + ce | - | - |" in (tmp_path / "out" / "results.md").read_text()


def test_bad_settings_fail_before_any_model_loads(setup, tmp_path):
    no_model = replace(setup, source="/nonexistent/dense")  # loading it would fail with another error
    with pytest.raises(ValueError, match="is the evaluation text: this benchmark trains on unrelated text only"):
        ru.run(replace(no_model, train_files=[*ru.TRAIN_FILES, WIKITEXT]), ["ce"], str(tmp_path / "a"))
    with pytest.raises(ValueError, match="--steps 5 must be a multiple of --eval-every 2"):
        ru.run(replace(no_model, steps=5), ["ce"], str(tmp_path / "b"))
    with pytest.raises(ValueError, match="unknown recipe 'lora'"):
        ru.run(no_model, ["ce", "lora"], str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="has no compression_report.json"):
        ru.run(replace(no_model, export=str(tmp_path)), ["ce"], str(tmp_path / "d"))
    with pytest.raises(ValueError, match="--recipes names no recipe"):
        ru.run(replace(no_model, dense_baseline=True), [], str(tmp_path / "e"))
    with pytest.raises(ValueError, match="no recipe here learns from. Fix: add a kd or hidden recipe"):
        ru.run(replace(no_model, teacher="recovered"), ["ce"], str(tmp_path / "f"))
    with pytest.raises(ValueError, match="unknown teacher 'student'"):
        ru.run(replace(no_model, teacher="student"), ["kd"], str(tmp_path / "g"))
    assert not any((tmp_path / x).exists() for x in "abcdefg")
    # --train-files reaches the same check from the command line.
    argv = ["--model", setup.export, "--source", "/nonexistent/dense", "--train-files", WIKITEXT, "--out", str(tmp_path / "h")]
    with pytest.raises(ValueError, match="is the evaluation text"):
        ru.main(argv)
    assert not (tmp_path / "h").exists()


def test_eval_start_article_scores_the_windows_of_the_next_article(setup):
    from flatten_lightning.data import held_out_ids

    points, module, _ = ru.recover(replace(setup, eval_start="article", steps=2, eval_every=2), "ce")
    ids = held_out_ids(module.tokenizer, read_text(WIKITEXT), 4 * 32, "article")
    assert points[-1]["ppl"] == pytest.approx(perplexity(module.base_model, ids, 64, 2, progress=False).ppl, rel=1e-5)
    tokens_start = held_out(tokenize(module.tokenizer, read_text(WIKITEXT)), 4, 32)
    assert points[-1]["ppl"] != pytest.approx(perplexity(module.base_model, tokens_start, 64, 2, progress=False).ppl, rel=1e-5)
