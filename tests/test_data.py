"""Text reading and window cutting."""

import json

import pytest
import torch
from conftest import word_tokenizer

from flatten_lightning.data import (
    TextFileError,
    article_starts,
    calibration_shares,
    calibration_windows,
    first_article_after,
    held_out,
    held_out_ids,
    interleaved_windows,
    read_text,
)


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


WIKI = " = A = \n a b c \n = = S = = \n d e \n = B = \n f g h \n = C = \n i \n"


def _words(text: str):
    """conftest's word-level tokenizer over ``text``'s words: one distinct id per word, counts read off the text."""
    return word_tokenizer(text.split())


def test_article_starts_are_the_title_lines_not_the_sections():
    assert [WIKI[s : s + 6] for s in article_starts(WIKI)] == [" = A =", " = B =", " = C ="]


def test_first_article_after_is_the_first_whose_prefix_holds_the_calibration_tokens():
    tok = _words(WIKI)
    b, c = article_starts(WIKI)[1:]
    assert len(WIKI[:b].split()) == 13  # article A, its section included
    assert first_article_after(tok, WIKI, 1) == b  # token 0 lies in A, so B is the first article it does not reach
    assert first_article_after(tok, WIKI, 13) == b  # the calibration ends with A's last token
    assert first_article_after(tok, WIKI, 14) == c  # one token into B: B is shared, so C
    with pytest.raises(ValueError, match="no article begins after the first 20 tokens.*fewer calibration tokens"):
        first_article_after(tok, WIKI, 20)  # C begins at token 19: a calibration of 20 reaches into it
    with pytest.raises(ValueError, match="no WikiText article heading"):
        first_article_after(tok, " plain text \n", 1)


def test_held_out_ids_start_after_the_tokens_or_at_the_next_article():
    text = " = A = \n a b c \n = B = \n d e \n"
    tok = _words(text)
    ids = tok(text.split(), is_split_into_words=True, add_special_tokens=False)["input_ids"]  # one id per word
    assert held_out_ids(tok, text, 4, "tokens").tolist() == ids[4:]  # mid-article: A's "b c" first
    assert held_out_ids(tok, text, 4, "article").tolist() == ids[6:]  # " = B = d e" alone
    assert held_out_ids(tok, text, 3, "article").tolist() == ids[6:]  # calibration ends inside A (its heading): B still
    assert held_out_ids(tok, text, 4, "tokens", ids=torch.arange(100)).tolist() == list(
        range(4, 100)
    )  # given ids: reused, not re-tokenized
    with pytest.raises(ValueError, match="held-out start must be one of"):
        held_out_ids(tok, text, 4, "next")


def test_first_article_after_finds_the_same_article_by_doubling_as_by_scanning():
    text = "".join(f" = T{i} = \n w{i} x \n" for i in range(11))  # 11 articles of 5 words each
    tok = _words(text)
    starts = article_starts(text)
    for n in range(1, 51):  # the scan: the first start whose prefix holds n tokens
        want = next(s for s in starts if len(text[:s].split()) >= n)
        assert first_article_after(tok, text, n) == want, n
    with pytest.raises(ValueError, match="no article begins after the first 51 tokens"):
        first_article_after(tok, text, 51)
