"""Text reading and window cutting."""

import json

import pytest
import torch

from flatten_lightning.data import calibration_windows, held_out, read_text


def test_calibration_and_held_out_are_disjoint_and_contiguous():
    ids = torch.arange(100)
    calib = calibration_windows(ids, 3, 10)
    assert calib.shape == (3, 10) and calib.flatten().tolist() == list(range(30))
    assert held_out(ids, 3, 10).tolist() == list(range(30, 100))


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
