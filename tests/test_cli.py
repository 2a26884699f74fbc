"""The compression command: a local-directory run end to end, and each bad input caught early."""

import json
import shutil

import pytest
from conftest import WIKITEXT
from lightning_helpers import ALPACA
from transformers import AutoModelForCausalLM

from flatten_lightning.cli import main, target_depth
from flatten_lightning.report import plans_of


def tiny_argv(tiny_dir, out, *extra: str) -> list[str]:
    """The command on the tiny model: 6 -> 4 layers, 4 x 32 calibration tokens, no progress bars."""
    base = ["--model", str(tiny_dir), "--target-layers", "4", "--calib-file", WIKITEXT, "--calib-samples", "4", "--calib-seqlen", "32"]
    return [*base, "--out", str(out), "--quiet", *extra]


def test_local_directory_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(tiny_argv(tiny_dir, out, "--eval-windows", "2", "--eval-seqlen", "64"))
    assert rc == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["layers"] == 4 and report["original_layers"] == 6
    assert report["params"]["compressed"] < report["params"]["dense"]
    assert report["calibration"]["tokens"] == 128
    assert len(plans_of(report)[0]["groups"]) == 4 and report["schema"] == 1
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 4
    assert (out / "tokenizer.json").exists()


def test_several_calibration_files(tiny_dir, tmp_path):
    out = tmp_path / "out"
    argv = tiny_argv(tiny_dir, out, "--eval-windows", "1", "--eval-seqlen", "64")
    argv[argv.index(WIKITEXT) + 1 : argv.index(WIKITEXT) + 1] = [ALPACA]  # --calib-file WIKITEXT ALPACA
    assert main(argv) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["calibration"]["files"] == [WIKITEXT, ALPACA] and report["calibration"]["windows_per_file"] == [2, 2]
    assert report["evaluation"]["after_calibration_tokens"] == 2 * 32  # held out: WikiText after its own 2 windows


def test_eval_start_article_holds_out_other_windows_and_says_so(tiny_dir, tmp_path):
    """--eval-start article scores windows from the next WikiText article: another text than right after calibration."""
    reports = {}
    for start in ("tokens", "article"):
        out = tmp_path / start
        assert main(tiny_argv(tiny_dir, out, "--eval-windows", "1", "--eval-seqlen", "64", "--eval-start", start)) == 0
        reports[start] = json.loads((out / "compression_report.json").read_text())
    assert [reports[s]["evaluation"]["start"] for s in ("tokens", "article")] == ["tokens", "article"]
    before = [reports[s]["perplexity"]["before_compression"] for s in ("tokens", "article")]
    assert before[0] != before[1]  # the same dense model on different held-out windows


def test_eval_start_article_refuses_text_without_articles_before_loading(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "nowhere"), "--target-layers", "2", "--calib-file", ALPACA, "--out", str(tmp_path / "o")]
    err = _err(capsys, [*argv, "--eval-windows", "1", "--eval-start", "article"])
    assert "--eval-start article needs WikiText-format text" in err and "Fix: --eval-start tokens" in err


def test_ratio():
    assert target_depth(30, None, 0.2) == 24
    with pytest.raises(ValueError, match="--ratio must be in"):
        target_depth(30, None, 1.5)


def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_existing_output_dir_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("1")
    err = _err(capsys, ["--model", str(tmp_path / "nowhere"), "--target-layers", "2", "--calib-file", WIKITEXT, "--out", str(out)])
    assert "exists and is not empty" in err and "--overwrite" in err


def test_missing_calibration_file(tmp_path, capsys):
    err = _err(capsys, ["--target-layers", "2", "--calib-file", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")])
    assert "none.txt does not exist" in err


def test_missing_model_dir(tmp_path, capsys):
    err = _err(
        capsys, ["--model", str(tmp_path / "nowhere"), "--target-layers", "2", "--calib-file", WIKITEXT, "--out", str(tmp_path / "o")]
    )
    assert "model directory" in err and "does not exist" in err


@pytest.mark.parametrize("target", ["6", "0"])
def test_impossible_target(tiny_dir, tmp_path, capsys, target):
    err = _err(capsys, ["--model", str(tiny_dir), "--target-layers", target, "--calib-file", WIKITEXT, "--out", str(tmp_path / "o")])
    assert f"target depth {target} is impossible for a model of 6 layers" in err
    assert not (tmp_path / "o").exists()


def test_calibration_text_too_short(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the of and " * 10)
    err = _err(
        capsys,
        [
            "--model",
            str(tiny_dir),
            "--target-layers",
            "3",
            "--calib-file",
            str(short),
            "--calib-samples",
            "8",
            "--calib-seqlen",
            "64",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "fewer than the 8 x 64 = 512 needed" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["shortgpt", "flatten-paper"])
def test_peer_methods_through_the_command(tiny_dir, tmp_path, method):
    out = tmp_path / method
    assert main(tiny_argv(tiny_dir, out, "--method", method)) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["method"] == method and report["layers"] == 4
    assert bool(plans_of(report)) == method.startswith("flatten")
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_unknown_method_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["--target-layers", "2", "--calib-file", WIKITEXT, "--out", "x", "--method", "flatten-noprune"])
    assert "invalid choice" in capsys.readouterr().err


def _args(model, out, *extra: str) -> list[str]:
    return ["--model", str(model), "--target-layers", "4", "--calib-file", WIKITEXT, "--calib-seqlen", "32", "--out", str(out), *extra]


@pytest.mark.parametrize(
    "extra, message",
    [(["--batch-size", "0"], "--batch-size: 0 is too small"), (["--eval-windows", "-1"], "--eval-windows: -1 is too small")],
)
def test_bad_counts_are_named_by_argparse(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(_args(tmp_path / "nowhere", tmp_path / "o", *extra))
    assert e.value.code == 2
    assert f"error: argument {message}. Fix: pass" in capsys.readouterr().err


def test_missing_device_is_named_before_loading(tmp_path, capsys):
    err = _err(capsys, _args(tmp_path / "nowhere", tmp_path / "o", "--device", "cuda:7"))  # a missing model: nothing gets loaded
    assert err.startswith("error: --device cuda:7 does not exist")


@pytest.mark.parametrize("ridge", ["nan", "inf"])
def test_non_finite_ridge_is_refused(tmp_path, capsys, ridge):
    with pytest.raises(SystemExit) as e:
        main(_args(tmp_path / "nowhere", tmp_path / "o", "--fit-ridge", ridge))
    assert e.value.code == 2
    assert f"--fit-ridge: the ridge must be a finite number >= 0, 'gcv' or 'cv', got '{ridge}'" in capsys.readouterr().err


def test_calibration_longer_than_the_model_positions_is_refused(tiny_dir, tmp_path, capsys):
    err = _err(capsys, _args(tiny_dir, tmp_path / "o", "--calib-seqlen", "512"))
    assert "--calib-seqlen 512 is above the model's max_position_embeddings 256" in err


def test_malformed_calibration_file_is_named_before_loading(tmp_path, capsys):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    err = _err(
        capsys, ["--model", str(tmp_path / "nowhere"), "--target-layers", "2", "--calib-file", str(bad), "--out", str(tmp_path / "o")]
    )
    assert err.startswith(f"error: {bad} line 2: no 'text' key")


def test_config_declaring_more_layers_than_the_weights_is_refused(tiny_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 8}))
    err = _err(capsys, _args(broken, tmp_path / "o"))
    assert f"error: model {broken} does not match its config.json: 18 weights missing" in err
    assert "model.layers.6.input_layernorm.weight" in err and not (tmp_path / "o").exists()


def test_model_directory_without_tokenizer_is_refused(tiny_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / f, bare / f)
    err = _err(capsys, _args(bare, tmp_path / "o"))
    assert f"error: model directory {bare} has no tokenizer" in err


def test_overwrite_never_deletes_the_source_model(tiny_dir, tmp_path, capsys):
    (tiny_dir / "compression_report.json").write_text("{}")  # even if it looks like an earlier export
    err = _err(capsys, _args(tiny_dir, tiny_dir, "--overwrite"))
    assert f"output directory {tiny_dir} is an input of this run" in err
    assert (tiny_dir / "model.safetensors").exists()


def test_unwritable_output_location_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _err(capsys, _args(tmp_path / "nowhere", tmp_path / "file" / "out"))
    assert f"output {tmp_path / 'file' / 'out'} cannot be created: {tmp_path / 'file'} is a file" in err


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--feedback", "2"], "feedback must be in [0, 1]"),
        (["--method", "flatten-paper", "--refit-passes", "1"], "fixes refit_passes"),
        (["--correction", "flattened", "--feedback", "0.5"], "correction='sequential'"),
        (["--method", "flatten-paper", "--fast"], "fixes fast"),
        (["--method", "flatten-paper", "--no-input-fit"], "fixes input_fit"),
        (["--method", "shortgpt", "--input-fit"], "--input-fit cannot be used with --method shortgpt"),
        (["--method", "shortgpt", "--fast"], "--fast cannot be used with --method shortgpt"),
    ],
)
def test_recipe_values_are_refused_before_loading(tmp_path, capsys, flags, msg):
    err = _err(capsys, _args(tmp_path / "nowhere", tmp_path / "o", *flags))  # a missing model: nothing gets loaded
    assert err.startswith("error: ") and msg in err


def test_given_groups_through_the_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(tiny_argv(tiny_dir, out, "--groups", "1-2", "4-5")) == 0
    assert plans_of(json.loads((out / "compression_report.json").read_text()))[0]["groups"] == [[0], [1, 2], [3], [4, 5]]
    err = _err(capsys, tiny_argv(tiny_dir, tmp_path / "o2", "--groups", "1-4"))  # 6 -> 3, not 4
    assert "not the target 4" in err and "Fix:" in err


@pytest.mark.parametrize("run", ["3-3", "12", "a-b"])
def test_malformed_group_runs_are_named_by_argparse(tmp_path, capsys, run):
    with pytest.raises(SystemExit):
        main(_args(tmp_path / "nowhere", tmp_path / "o", "--groups", run))
    assert "FIRST-LAST" in capsys.readouterr().err


def test_input_fit_flag_reaches_the_plan_and_changes_the_model(tiny_dir, tmp_path):
    runs = {}
    for flag in ("--input-fit", "--no-input-fit"):
        out = tmp_path / flag.strip("-")
        assert main(tiny_argv(tiny_dir, out, flag, "--groups", "1-2", "4-5")) == 0
        runs[flag] = (plans_of(json.loads((out / "compression_report.json").read_text()))[0], (out / "model.safetensors").read_bytes())
    assert runs["--input-fit"][0]["config"]["input_fit"] is True and runs["--no-input-fit"][0]["config"]["input_fit"] is False
    assert (
        "mlp_inputs" in runs["--input-fit"][0]["steps"][0]["ridge"] and "mlp_inputs" not in runs["--no-input-fit"][0]["steps"][0]["ridge"]
    )
    assert runs["--input-fit"][1] != runs["--no-input-fit"][1]
