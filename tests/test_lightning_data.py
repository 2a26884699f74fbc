"""FlattenDataModule: token layout (validation never trained on), calibration shards, resumable order."""

import pytest
import torch
from conftest import WIKITEXT, word_tokenizer
from lightning_helpers import ALPACA

from flatten_lightning.lightning.datamodule import FlattenDataModule, ResumableSampler, Windows


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(open(WIKITEXT, encoding="utf-8").read(20000).split()[:500])


def _dm(tokenizer, **kw) -> FlattenDataModule:
    args = dict(
        calib_file=WIKITEXT, calib_samples=4, calib_seqlen=32, train_files=[ALPACA, WIKITEXT], train_seqlen=16, val_windows=3, val_seqlen=64
    )
    dm = FlattenDataModule(**{**args, **kw})
    dm.prepare(tokenizer)
    return dm


def test_layout_keeps_validation_text_out_of_training(tokenizer):
    dm = _dm(tokenizer)
    from flatten_lightning.data import read_text, tokenize

    wiki = tokenize(tokenizer, read_text(WIKITEXT))
    alpaca = tokenize(tokenizer, read_text(ALPACA))
    assert torch.equal(dm.calibration, wiki[:128].view(4, 32))
    assert torch.equal(dm.validation_ids, wiki[128:])  # held out: after the calibration tokens
    n_alpaca = alpaca.numel() // 16
    assert len(dm.train) == n_alpaca + 128 // 16  # WikiText contributes only its calibration tokens
    assert torch.equal(dm.train[n_alpaca:].reshape(-1), wiki[:128])
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch[0], wiki[128:192])


def test_validation_from_the_next_article_is_the_librarys_held_out_text(tokenizer):
    from flatten_lightning.data import held_out_ids, read_text

    dm = _dm(tokenizer, val_start="article")
    want = held_out_ids(tokenizer, read_text(WIKITEXT), 128, "article")
    assert torch.equal(dm.validation_ids, want)
    assert want.numel() < _dm(tokenizer).validation_ids.numel()  # it starts later: the rest of article 1 is skipped
    assert dm.describe()["validation"]["start"] == "article"  # the report says which text was scored
    with pytest.raises(ValueError, match="val_start must be one of"):
        _dm(tokenizer, val_start="next")


def test_separate_validation_file_starts_at_zero_and_is_not_trained_on(tokenizer):
    with pytest.raises(ValueError, match="gives no window of 16 tokens outside its validation region"):
        _dm(tokenizer, calib_file=ALPACA, val_file=WIKITEXT)
    dm = _dm(tokenizer, calib_file=ALPACA, val_file=WIKITEXT, train_files=[ALPACA])
    assert dm.validation_ids.numel() > 1000 and dm.describe()["validation"]["after_calibration_tokens"] == 0


def test_several_calibration_files_take_turns_and_validation_follows_the_first(tokenizer):
    from flatten_lightning.data import read_text, tokenize

    dm = _dm(tokenizer, calib_file=[WIKITEXT, ALPACA], calib_samples=5)
    wiki = tokenize(tokenizer, read_text(WIKITEXT))
    alpaca = tokenize(tokenizer, read_text(ALPACA))
    assert torch.equal(dm.calibration[0::2].reshape(-1), wiki[:96]) and torch.equal(dm.calibration[1::2].reshape(-1), alpaca[:64])
    assert torch.equal(dm.validation_ids, wiki[96:])  # WikiText gave 3 of the 5 windows
    assert torch.equal(dm.train[-96 // 16 :].reshape(-1), wiki[:96])  # training stops where validation starts
    described = dm.describe()
    assert described["calibration"]["windows_per_file"] == [3, 2] and described["validation"]["after_calibration_tokens"] == 96
    with pytest.raises(ValueError, match="2 calibration files need at least 2 windows"):
        FlattenDataModule(calib_file=[WIKITEXT, ALPACA], calib_samples=1)
    with pytest.raises(ValueError, match="listed twice"):
        FlattenDataModule(calib_file=[WIKITEXT, ALPACA, WIKITEXT])


def test_calibration_shards_partition_the_windows(tokenizer):
    dm = _dm(tokenizer)
    shards = [dm.calibration_shard(r, 3) for r in range(3)]
    rows = sorted(tuple(x.tolist()) for s in shards for x in s)
    assert rows == sorted(tuple(x.tolist()) for x in dm.calibration)
    with pytest.raises(ValueError, match="4 calibration windows cannot be shared by 5 ranks"):
        dm.calibration_shard(0, 5)


def test_missing_files_fail_when_the_config_is_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="training file .*nope.json does not exist"):
        FlattenDataModule(calib_file=WIKITEXT, train_files=[str(tmp_path / "nope.json")])
    with pytest.raises(FileNotFoundError, match="calibration file"):
        FlattenDataModule(calib_file=str(tmp_path / "x.txt"))


def test_calibration_text_too_short(tokenizer):
    with pytest.raises(ValueError, match="fewer than the 100000 x 32"):
        _dm(tokenizer, calib_samples=100000)


def test_sampler_order_is_seeded_per_epoch_and_resumes_mid_epoch():
    ds = Windows(torch.arange(40).view(20, 2))
    s = ResumableSampler(ds, batch_size=3, num_replicas=1, rank=0, seed=7)
    e0 = list(s)
    assert e0 == list(ResumableSampler(ds, 3, 1, 0, seed=7)) and sorted(e0) == list(range(20))
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0
    r = ResumableSampler(ds, 3, 1, 0, seed=7)
    r.resume(1, 2)  # two batches of epoch 1 were trained on
    assert list(r) == e1[6:]
    assert list(r) == e1  # the skip applies once
    other_ranks = [list(ResumableSampler(ds, 3, 2, k, seed=7)) for k in range(2)]
    assert sorted(other_ranks[0] + other_ranks[1]) == list(range(20))
