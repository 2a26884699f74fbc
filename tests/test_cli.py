"""The compression command: a local-directory run end to end, and each bad input caught early."""

import json

import pytest
from conftest import WIKITEXT
from transformers import AutoModelForCausalLM

from flatten_lightning.cli import main, target_depth
from flatten_lightning.report import plans_of


def test_local_directory_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "--model",
            str(tiny_dir),
            "--target-layers",
            "4",
            "--calib-file",
            WIKITEXT,
            "--calib-samples",
            "4",
            "--calib-seqlen",
            "32",
            "--out",
            str(out),
            "--eval-windows",
            "2",
            "--eval-seqlen",
            "64",
            "--quiet",
        ]
    )
    assert rc == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["layers"] == 4 and report["original_layers"] == 6
    assert report["params"]["compressed"] < report["params"]["dense"]
    assert report["calibration"]["tokens"] == 128
    assert len(plans_of(report)[0]["groups"]) == 4 and report["schema"] == 1
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 4
    assert (out / "tokenizer.json").exists()


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
    assert (
        main(
            [
                "--model",
                str(tiny_dir),
                "--target-layers",
                "4",
                "--calib-file",
                WIKITEXT,
                "--calib-samples",
                "4",
                "--calib-seqlen",
                "32",
                "--out",
                str(out),
                "--method",
                method,
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "compression_report.json").read_text())
    assert report["method"] == method and report["layers"] == 4
    assert bool(plans_of(report)) == method.startswith("flatten")
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_unknown_method_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["--target-layers", "2", "--calib-file", WIKITEXT, "--out", "x", "--method", "flatten-noprune"])
    assert "invalid choice" in capsys.readouterr().err
