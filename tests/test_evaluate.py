"""The evaluation command on an exported tiny model dir: window/token counts, zero-shot item counts on
a tiny zero-shot folder written here in the release formats, the dataset path, and input errors."""

from __future__ import annotations

import bz2
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, WIKITEXT
from transformers import AutoTokenizer

from flatten_lightning import evaluate as E
from flatten_lightning.data import read_text, tokenize
from flatten_lightning.perplexity import perplexity
from flatten_lightning.sources import load_model


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


def _arc(i: int, key: str) -> dict:
    labels = ["1", "2", "3", "4"] if key.isdigit() else ["A", "B", "C", "D"]
    return {
        "id": f"q{i}",
        "question": {
            "stem": f"Which is the {i} one?",
            "choices": [{"text": f"the {w}", "label": lab} for w, lab in zip(["game", "season", "war", "city"], labels)],
        },
        "answerKey": key,
    }


def tiny_zeroshot_dir(root: Path, n: int = 3) -> Path:
    """The five paper tasks with ``n`` items each, in the public release formats (see data README)."""
    _jsonl(root / "piqa/valid.jsonl", [{"goal": f"How to play game {i}?", "sol1": "play the game", "sol2": "the war"} for i in range(n)])
    _lines(root / "piqa/valid-labels.lst", [str(i % 2) for i in range(n)])
    _jsonl(root / "arc_easy/ARC-Easy-Test.jsonl", [_arc(i, "B") for i in range(n)])
    _jsonl(root / "arc_challenge/ARC-Challenge-Test.jsonl", [_arc(i, "3") for i in range(n)])
    _jsonl(
        root / "winogrande/winogrande.jsonl",
        [
            {
                "context_options": ["The game was won by the team so the team", "The game was won by the team so the city"],
                "continuation": "was happy.",
                "gold": i % 2,
            }
            for i in range(n)
        ],
    )
    _lines(root / "winogrande/dev-labels.lst", [str(i % 2 + 1) for i in range(n)])
    hs = []
    for i in range(n):
        hs += ["Playing game: The team played the game. they", str(i % 4), "won.", "lost the war.", "went to the city.", "sang."]
    (root / "hellaswag").mkdir(parents=True, exist_ok=True)
    with bz2.open(root / "hellaswag/hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("\n".join(hs) + "\n")
    return root


def _tokens(model_dir: Path, text_path: str) -> int:
    return tokenize(AutoTokenizer.from_pretrained(model_dir), read_text(text_path)).numel()


def test_window_and_token_counts_with_cap(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    assert (
        E.main(
            [
                "--model",
                str(tiny_dir),
                "--wikitext",
                WIKITEXT,
                "--seqlen",
                "64",
                "--max-windows",
                "5",
                "--batch-size",
                "2",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    total = _tokens(tiny_dir, WIKITEXT)
    p = r["perplexity"]
    assert p["text_tokens"] == total and total // 64 > 5
    assert (p["n_windows"], p["n_tokens"], p["seqlen"]) == (5, 5 * 63, 64)
    model, tok = load_model(str(tiny_dir))
    direct = perplexity(model, tokenize(tok, read_text(WIKITEXT)), 64, 5, progress=False)
    assert p["ppl"] == pytest.approx(direct.ppl, rel=1e-9)
    assert r["zeroshot"] is None and r["layers"] == 6


def test_counts_without_cap_and_with_skipped_tokens(tiny_dir, tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text(" ".join(open(WIKITEXT, encoding="utf-8").read(20000).split()[:1000]), encoding="utf-8")
    total = _tokens(tiny_dir, str(text))
    out = tmp_path / "r.json"
    assert (
        E.main(
            [
                "--model",
                str(tiny_dir),
                "--wikitext",
                str(text),
                "--seqlen",
                "48",
                "--skip-tokens",
                "100",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    p = json.loads(out.read_text())["perplexity"]
    n = (total - 100) // 48
    assert (p["n_windows"], p["n_tokens"], p["skip_tokens"]) == (n, n * 47, 100)
    assert "| model | layers | params (M) | ppl |" in capsys.readouterr().out


def test_zero_shot_counts_on_a_release_format_folder(tiny_dir, tmp_path, capsys):
    zs = tiny_zeroshot_dir(tmp_path / "zs", n=3)
    out = tmp_path / "r.json"
    assert (
        E.main(
            [
                "--model",
                str(tiny_dir),
                "--wikitext",
                WIKITEXT,
                "--seqlen",
                "32",
                "--max-windows",
                "2",
                "--zeroshot-dir",
                str(zs),
                "--limit",
                "2",
                "--tasks",
                "piqa,winogrande",
                "hellaswag",
                "arc_easy",
                "arc_challenge",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert (r["perplexity"]["n_windows"], r["perplexity"]["n_tokens"]) == (2, 62)
    z = r["zeroshot"]
    for task in ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"):
        assert z[task]["n"] == 2, task
        assert 0.0 <= z[task]["acc"] <= 1.0
    assert z["paper_avg"] is not None
    table = capsys.readouterr().out
    assert "5-task avg" in table and "tiny-llama" in table


def test_dataset_spec_joins_rows_like_the_protocol(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"text": [" = Title = \n", " body \n", ""]}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert E.load_text("wikitext:wikitext-2-raw-v1:test") == " = Title = \n\n\n body \n\n\n"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]


def test_input_errors_come_before_the_model_loads(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")
    assert E.main(["--model", missing_model, "--wikitext", str(tmp_path / "none.txt"), "--out", str(tmp_path / "r.json")]) == 2
    assert "none.txt does not exist" in capsys.readouterr().err
    (tmp_path / "zs/piqa").mkdir(parents=True)
    assert E.main(["--model", missing_model, "--zeroshot-dir", str(tmp_path / "zs"), "--tasks", "piqa"]) == 2
    assert "piqa/valid.jsonl" in capsys.readouterr().err
    assert E.main(["--model", missing_model]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_runs_as_a_module(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flatten_lightning.evaluate",
            "--model",
            str(tiny_dir),
            "--wikitext",
            WIKITEXT,
            "--seqlen",
            "64",
            "--max-windows",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["perplexity"]["n_windows"] == 1
    assert "| tiny-llama | 6 |" in proc.stdout


def _eval_args(model, out, *extra: str) -> list[str]:
    return ["--model", str(model), "--wikitext", WIKITEXT, "--seqlen", "64", "--max-windows", "1", "--out", str(out), "--quiet", *extra]


def test_out_never_replaces_a_file_that_is_not_its_results(tiny_dir, tmp_path, capsys):
    config = tiny_dir / "config.json"
    before = config.read_text()
    assert E.main(_eval_args(tiny_dir, config)) == 2
    assert f"error: --out {config} exists and is not a results file of this command" in capsys.readouterr().err
    assert config.read_text() == before


def test_out_replaces_an_earlier_results_file(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({k: None for k in E.RESULT_KEYS}))
    assert E.main(_eval_args(tiny_dir, out)) == 0
    assert json.loads(out.read_text())["perplexity"]["n_windows"] == 1
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert E.main(_eval_args(tiny_dir, other, "--overwrite")) == 0  # --overwrite: the user said so
    assert json.loads(other.read_text())["layers"] == 6


@pytest.mark.parametrize("flag", ["--limit", "--batch-size", "--max-windows"])
def test_bad_counts_are_named_by_argparse(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        E.main(_eval_args(tmp_path / "no-model", tmp_path / "r.json", flag, "0"))
    assert e.value.code == 2
    assert f"error: argument {flag}: 0 is too small. Fix: pass 1 or more" in capsys.readouterr().err


def test_missing_device_is_named_before_loading(tmp_path, capsys):
    assert E.main(_eval_args(tmp_path / "no-model", tmp_path / "r.json", "--device", "cuda:5")) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda:5 does not exist")


def test_mistyped_local_path_is_not_tried_on_the_hub(tmp_path, capsys):
    spec = "tests/wikitext-2/valid.txt:test"  # a local-looking path with a colon
    assert E.main(["--model", str(tmp_path / "no-model"), "--wikitext", spec, "--out", str(tmp_path / "r.json")]) == 2
    assert f"error: text file {spec} does not exist (it looks like a local path, so the hub is not tried)" in capsys.readouterr().err


def test_seqlen_above_the_model_positions_is_refused(tiny_dir, tmp_path, capsys):
    assert E.main([*_eval_args(tiny_dir, tmp_path / "r.json"), "--seqlen", "512"]) == 2
    assert "--seqlen 512 is above the model's max_position_embeddings 256" in capsys.readouterr().err


def test_bad_zero_shot_label_is_named_before_the_model_loads(tmp_path, capsys):
    zs = tiny_zeroshot_dir(tmp_path / "zs")
    _lines(zs / "piqa/valid-labels.lst", ["0", "yes", "1"])
    argv = ["--model", str(tmp_path / "no-model"), "--zeroshot-dir", str(zs), "--tasks", "piqa", "--out", str(tmp_path / "r.json")]
    assert E.main(argv) == 2
    assert f"error: {zs / 'piqa/valid-labels.lst'} line 2: label 'yes' is not one of 0, 1" in capsys.readouterr().err
