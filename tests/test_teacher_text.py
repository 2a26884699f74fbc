"""benchmarks/teacher_text.py: which tokens prompt the dense model, that its rows are full length and read back as
training text, and the refusals that come before any model loads."""

import json
import os
import sys

import pytest
import torch
from conftest import WIKITEXT
from lightning_helpers import tiny_model_dir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))  # the script imports its siblings
import teacher_text  # noqa: E402

from flatten_lightning.data import read_text  # noqa: E402


def test_prompts_are_the_first_tokens_of_windows_spread_through_the_text():
    ids = torch.arange(100)
    p = teacher_text.prompts(ids, seqlen=10, prompt_tokens=3, samples=4)  # 10 windows, 4 asked: 0, 3, 6, 9
    assert p.tolist() == [[0, 1, 2], [30, 31, 32], [60, 61, 62], [90, 91, 92]]
    every = teacher_text.prompts(ids, seqlen=10, prompt_tokens=3, samples=50)  # fewer windows than asked: each once
    assert every[:, 0].tolist() == list(range(0, 100, 10))
    with pytest.raises(ValueError, match="less than one window"):
        teacher_text.prompts(ids[:5], seqlen=10, prompt_tokens=3, samples=4)


def test_rows_are_full_length_continuations_of_their_prompts(tmp_path):
    from flatten_lightning.sources import load_model

    model, _ = load_model(str(tiny_model_dir(tmp_path / "m")))
    eos = model.generation_config.eos_token_id = model.config.eos_token_id = 3
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 50.0)))
    p = torch.randint(4, model.config.vocab_size, (5, 4))
    a = teacher_text.continue_prompts(model, p, 6, 1.0, 1.0, batch_size=2, seed=0)
    assert a.shape == (5, 10) and torch.equal(a[:, :4], p)  # every prompt kept
    assert not (a[:, 4:] == eos).any()  # end-of-text, made nearly certain here, is never sampled: no row ends early
    b = teacher_text.continue_prompts(model, p, 6, 1.0, 1.0, batch_size=2, seed=0)
    c = teacher_text.continue_prompts(model, p, 6, 1.0, 1.0, batch_size=2, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded: the same rows again, other rows for another seed


def test_the_written_file_is_training_text_and_is_never_overwritten(tmp_path, monkeypatch, capsys):
    model = str(tiny_model_dir(tmp_path / "m"))
    prompt_file = tmp_path / "p.txt"  # words the tiny tokenizer knows, in a file that is not the evaluation text
    prompt_file.write_text(open(WIKITEXT, encoding="utf-8").read(4000))
    out = tmp_path / "t.jsonl"
    argv = ["teacher_text.py", "--source", model, "--prompt-files", str(prompt_file), "--samples", "3", "--seqlen", "12"]
    monkeypatch.setattr(sys, "argv", [*argv, "--prompt-tokens", "4", "--batch-size", "2", "--out", str(out)])
    teacher_text.main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["text"] for r in rows)
    assert read_text(str(out)) == "\n\n".join(r["text"] for r in rows)  # what --train-files will read
    before = out.read_text()
    with pytest.raises(SystemExit) as e:
        teacher_text.main()
    assert e.value.code == 2 and "does not overwrite" in capsys.readouterr().err and out.read_text() == before


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--out", "x.txt"], "must end in .jsonl"),
        (["--out", "/no/such/dir/t.jsonl"], "does not exist"),
        (["--out", "t.jsonl", "--prompt-tokens", "256"], "0 < --prompt-tokens < --seqlen"),
        (["--out", "t.jsonl", "--top-p", "0"], "0 < --top-p <= 1"),
        (["--out", "t.jsonl", "--prompt-files", WIKITEXT], "is the evaluation text"),
    ],
)
def test_bad_settings_are_refused_before_any_model_loads(monkeypatch, capsys, tmp_path, extra, msg):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(teacher_text, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(sys, "argv", ["teacher_text.py", *extra])
    with pytest.raises(SystemExit) as e:
        teacher_text.main()
    assert e.value.code == 2 and msg in capsys.readouterr().err
