"""Text reading and window cutting."""

import json

import pytest
import torch

from flatten_lightning.data import TextFileError, calibration_shares, calibration_windows, held_out, interleaved_windows, read_text


def test_calibration_and_held_out_are_disjoint_and_contiguous():
    ids = torch.arange(100)
    calib = calibration_windows(ids, 3, 10)
    assert calib.shape == (3, 10) and calib.flatten().tolist() == list(range(30))
    assert held_out(ids, 3, 10).tolist() == list(range(30, 100))


def test_interleaved_windows_take_turns_each_from_its_own_start():
    a, b, c = torch.arange(100), torch.arange(1000, 1100), torch.arange(2000, 2100)
    assert calibration_shares(7, 3) == [3, 2, 2]
    calib = interleaved_windows([a, b, c], 7, 10, ["a", "b", "c"])
    starts = [w[0].item() for w in calib]
    assert starts == [0, 1000, 2000, 10, 1010, 2010, 20]  # any prefix mixes every source
    assert torch.equal(calib[6], torch.arange(20, 30))  # contiguous windows, no token reused
    assert held_out(a, calibration_shares(7, 3)[0], 10)[0].item() == 30  # file a's held-out text starts after its share
    assert torch.equal(interleaved_windows([a], 3, 10, ["a"]), calibration_windows(a, 3, 10))


def test_more_files_than_windows_is_refused():
    with pytest.raises(ValueError, match="3 calibration files need at least 3 windows, got 2.*--calib-samples"):
        calibration_shares(2, 3)


def test_text_too_short_for_requested_windows():
    with pytest.raises(ValueError, match="has 100 tokens, fewer than the 4 x 32 = 128 needed.*--calib-samples"):
        calibration_windows(torch.arange(100), 4, 32, "tiny.txt")


def test_read_formats(tmp_path):
    (tmp_path / "a.txt").write_text(" = Title = \n\n text \n")
    assert read_text(str(tmp_path / "a.txt")) == " = Title = \n\n text \n"  # read whole, untouched
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_text(str(tmp_path / "c.jsonl")) == "one\n\ntwo"
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Do", "input": "", "output": "Done"}]))
    assert read_text(str(tmp_path / "a.json")) == "Do\nDone"
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_text(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.jsonl", '{"text": "a"}\n\n{"text": "b"\n', "line 3: not valid JSON"),
        ("c.jsonl", '{"text": "a"}\n{"body": "b"}\n', "line 2: no 'text' key"),
        ("c.jsonl", '{"text": "a"}\n["b"]\n', "line 2: a JSON list, not an object"),
        ("c.json", '{"instruction": "a"}', "is not a list of Alpaca rows"),
        ("c.json", '[{"instruction": "a"}, {"text": "b"}]', "row 1: needs string 'instruction'/'input'/'output' fields"),
        ("c.json", '[{"instruction": "a"},', "line 1: not valid JSON"),
        ("c.txt", b"ok \xff\xfe bad", "is not UTF-8 text"),
        ("c.jsonl", b'{"text": "\xff"}\n', "is not UTF-8 text"),
    ],
    ids=[
        "jsonl-syntax",
        "jsonl-no-text",
        "jsonl-not-object",
        "json-not-list",
        "json-not-alpaca",
        "json-syntax",
        "txt-binary",
        "jsonl-binary",
    ],
)
def test_malformed_text_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TextFileError, match=f"^{path}.*{message}.*Fix"):
        read_text(str(path))
