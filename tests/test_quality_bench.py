"""benchmarks/quality.py (issue 12's table): the table's arithmetic and the refusals that come before any model loads."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))  # the script imports its siblings
import quality  # noqa: E402


def _zs(acc: float, acc_norm: float | None) -> dict:
    return {"acc": acc, "acc_norm": acc_norm, "n": 10}


def test_table_divides_by_dense_and_by_the_stored_forward_and_reports_acc_norm_where_the_task_has_it():
    tasks = {t: _zs(0.2, 0.4) for t in quality.PAPER_TASKS} | {"winogrande": _zs(0.6, None)}
    results = {
        "forward_s": 20.0,  # the cost column's unit: 50 s of compression is 2.5 forwards
        "rows": {
            "dense": {"ppl": 10.0},
            "flatten": {"ppl": 15.0, "seconds": 50.0, "zeroshot": tasks | {"avg": 0.44}},
        },
    }
    lines = quality.table(results).splitlines()
    dense, ours = lines[2], lines[3]
    assert dense.startswith("| dense | 10.00 | 1.000 | - | - |") and dense.endswith("| - |")
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells[:5] == ["flatten", "15.00", "1.500", "50", "2.50"]
    accs = dict(zip(quality.PAPER_TASKS, cells[5:10]))
    assert accs["winogrande"] == "60.0" and accs["piqa"] == "40.0"  # acc where the task has no acc_norm
    assert cells[10] == "44.0"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--rows", "dense,bogus"], "unknown row 'bogus'"),
        (["--rows", "dense", "--zeroshot-rows", "nope"], "unknown row 'nope'"),
        (["--rows", "recovered"], "add flatten to --rows"),
        (["--rows", "flatten,recovered-shortgpt"], "add shortgpt to --rows"),
        (["--rows", "shortgpt,recovered-shortgpt", "--recover-recipe", "kd"], "use ce"),
        (["--rows", "dense", "--recover-lr", "0"], "--recover-lr 0.0 must be > 0"),
        (["--rows", "dense", "--recover-steps", "8", "--recover-warmup", "8"], "--recover-warmup 8 in [0, --recover-steps 8)"),
    ],
)
def test_bad_rows_are_refused_before_any_model_loads(monkeypatch, capsys, argv, msg):
    monkeypatch.setattr(quality, "resolve_source", lambda s: pytest.fail("a model source was resolved"))
    monkeypatch.setattr(sys, "argv", ["quality.py", *argv])
    with pytest.raises(SystemExit) as e:
        quality.main()
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_mixed_row_replaces_the_wikitext_calibration_with_three_files(monkeypatch):
    """The command run_compression builds for the mixed row, read back by the compression command's own parser."""
    import compress_bench

    from flatten_lightning.cli import parser

    ran = []
    monkeypatch.setattr(compress_bench.subprocess, "run", lambda cmd, check: ran.append(cmd))
    with pytest.raises(FileNotFoundError):  # nothing ran, so no report: only the command line is checked
        compress_bench.run_compression("m", "flatten", 24, 3, 512, "/nonexistent-out", [], quality.CALIBRATION["mixed"])
    args = parser().parse_args(ran[0][3:])  # after: python -m flatten_lightning.cli
    assert [os.path.basename(f) for f in args.calib_file] == ["valid.txt", "c4_demo.jsonl", "alpaca_en_demo.json"]


def test_compressed_rows_are_keyed_by_the_config_the_command_resolves(monkeypatch):
    """The key is the whole CompressConfig the command would run, defaults included, so a row measured before
    a default or a flag changed is measured again, not reused."""
    from flatten_lightning.compress import CompressConfig

    fast, paper = quality.compressed_config("fast", 24), quality.compressed_config("paper", 24)
    assert fast["fast"] is True and fast["input_stride"] == 1 and fast["target_layers"] == 24
    assert paper["candidates"] == 1 and paper["correction"] == "flattened"  # the paper's recipe, not our defaults
    assert quality.compressed_config("shortgpt", 24) is None
    assert quality.compressed_config("flatten", 24)["candidates"] == CompressConfig(24).candidates  # today's default
    monkeypatch.setitem(quality.COMPRESSED, "flatten", ("flatten", ["--candidates", "1"]))
    assert quality.compressed_config("flatten", 24)["candidates"] == 1


def test_a_row_stored_before_the_config_was_part_of_its_key_is_measured_again():
    """main() reuses a stored row only if its settings equal row_settings: an "ours" row stored with its zero-shot
    flag alone (the earlier key) no longer matches; dense and ShortGPT rows still do; recovered follows flatten's config."""
    old = {"zeroshot": True}
    train = {"recipe": "ce", "steps": 64, "lr": 5e-4, "lr_schedule": "constant", "warmup_steps": 0}
    assert quality.row_settings("flatten", 24, True, train) != old
    assert quality.row_settings("dense", 24, True, train) == old == quality.row_settings("shortgpt", 24, True, train)
    recovered = quality.row_settings("recovered", 24, True, train)
    assert recovered == {"zeroshot": True, "config": quality.compressed_config("flatten", 24)} | train
    assert quality.export_key(recovered) == quality.export_key(quality.row_settings("recovered", 24, False, train))
    peer = quality.row_settings("recovered-shortgpt", 24, True, train | {"lr_schedule": "cosine"})
    assert peer == {"zeroshot": True} | train | {"lr_schedule": "cosine"}  # ShortGPT has no CompressConfig to key on


def test_ours_is_recovered_on_the_dense_source_and_a_peer_export_as_a_model_of_its_own():
    """Ours replays its plans on the dense source (the teacher stays the source); ShortGPT's export holds no plan,
    so it is trained as the source itself. Both on the same held-out windows, recipe steps and one evaluation."""
    import argparse

    args = argparse.Namespace(
        calib_samples=16,
        calib_seqlen=512,
        eval_windows=4,
        recover_recipe="ce",
        recover_steps=32,
        recover_lr=1e-3,
        recover_schedule="cosine",
        recover_warmup=8,
    )
    ours, own = quality.recovery_setup("recovered", "/r/smollm2", "src", args)
    assert not own and ours.export == "/r/smollm2/flatten" and ours.source == "src"
    peer, own = quality.recovery_setup("recovered-shortgpt", "/r/smollm2", "src", args)
    assert own and peer.export == peer.source == "/r/smollm2/shortgpt"
    mixed, own = quality.recovery_setup("recovered-mixed", "/r/smollm2", "src", args)
    assert not own and mixed.export == "/r/smollm2/mixed" and mixed.source == "src"  # ours again: a plan to replay
    for s in (ours, peer, mixed):
        assert (s.calib_samples, s.calib_seqlen, s.eval_windows, s.steps, s.eval_every) == (16, 512, 4, 32, 32)
        assert (s.lr, s.lr_schedule, s.warmup_steps) == (1e-3, "cosine", 8)


def test_recovery_reuses_the_perplexities_the_run_already_measured():
    """recover's step 0 and reference are the rows measured earlier on the same windows, not a second forward:
    for ours the dense and flatten rows, for a peer's export (its own source) its compressed row; a row not run
    yet is left for the recovery to measure."""
    rows = {"dense": {"ppl": 18.0}, "flatten": {"ppl": 24.0}, "shortgpt": {"ppl": 40.0}}
    assert quality.known_perplexities(rows, "recovered") == {"dense": 18.0, "compressed": 24.0}
    assert quality.known_perplexities(rows, "recovered-shortgpt") == {"dense": 40.0}
    assert quality.known_perplexities({"flatten": {"ppl": 24.0}}, "recovered") == {"compressed": 24.0}
    assert quality.known_perplexities(rows | {"mixed": {"ppl": 27.0}}, "recovered-mixed") == {"dense": 18.0, "compressed": 27.0}


def test_bars_read_each_threshold_off_the_rows_and_leave_out_bars_whose_rows_are_missing():
    def zs(avg: float) -> dict:
        return {"avg": avg}

    results = {
        "forward_s": 10.0,
        "rows": {
            "dense": {"ppl": 20.0},
            "flatten": {"ppl": 26.9, "zeroshot": zs(0.460)},  # 1.345x: met
            "shortgpt": {"ppl": 40.0, "zeroshot": zs(0.441)},  # +1.9 points: not met
            "fast": {"ppl": 27.4, "seconds": 24.0},  # 1.0186x at 2.4 forwards: met
        },
    }
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in quality.bars(results).splitlines()[2:]}
    assert rows["no training"][2:] == ["1.345", "<= 1.35", "yes"]
    assert rows["zero-shot"][2] == "+1.9" and rows["zero-shot"][4] == "no"
    assert rows["fast mode"][2:] == ["1.019 at 2.40", "<= 1.02 at <= 2.5", "yes"]
    assert "recovery on unrelated text" not in rows  # no recovered row: not guessed
    # With each item's score kept, the zero-shot gap also gets its paired standard error (zeroshot.paired_gap).
    for name, hits in (("flatten", [1.0, 1.0, 0.0, 0.0]), ("shortgpt", [1.0, 0.0, 0.0, 0.0])):
        results["rows"][name]["zeroshot"] |= {t: {"items": hits} for t in quality.PAPER_TASKS}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in quality.bars(results).splitlines()[2:]}
    assert rows["zero-shot"][2] == f"+1.9 (paired s.e. {100 * math.sqrt(0.25 / 4) * math.sqrt(5) / 5:.1f})"
    results["rows"]["fast"]["seconds"] = 26.0  # 2.6 forwards: over the cost bar though within 2%
    results["rows"]["recovered"] = {"ppl": 23.2}  # 1.16x
    rows = {line.split("|")[1].strip(): line for line in quality.bars(results).splitlines()[2:]}
    assert rows["fast mode"].endswith("| no |") and rows["recovery on unrelated text"].endswith("| 1.160 | <= 1.15 | no |")
    assert "zero-shot, both recovered" not in rows  # the peer's recovered row is missing
    results["rows"]["recovered"]["zeroshot"] = zs(0.470)
    results["rows"]["recovered-shortgpt"] = {"ppl": 30.0, "zeroshot": zs(0.448)}
    rows = {line.split("|")[1].strip(): line for line in quality.bars(results).splitlines()[2:]}
    assert rows["zero-shot, both recovered"].endswith("| +2.2 | >= +2.0 | yes |")
    assert "zero-shot, mixed calibration" not in rows and "zero-shot, mixed, both recovered" not in rows  # no mixed rows
    results["rows"]["mixed"] = {"ppl": 30.0, "zeroshot": zs(0.462)}
    results["rows"]["recovered-mixed"] = {"ppl": 24.0, "zeroshot": zs(0.466)}
    rows = {line.split("|")[1].strip(): line for line in quality.bars(results).splitlines()[2:]}
    assert rows["zero-shot, mixed calibration"].endswith("| +2.1 | >= +2.0 | yes |")  # against the untrained peer
    assert rows["zero-shot, mixed, both recovered"].endswith("| +1.8 | >= +2.0 | no |")  # against the recovered peer
