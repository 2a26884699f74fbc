"""FlattenDataModule: calibration, recovery and validation token windows from local text files.

Files are read with ``flatten_lightning.data.read_text`` (.txt whole, .jsonl "text" rows, .json Alpaca
rows). Token layout of a file used for several roles, so that validation text is never seen:

    calib_file:  [ calibration windows (calib_samples x calib_seqlen) | held-out tokens ... ]
                 (several files: windows in turn, each file's share from its own start, held-out after it)
    val_file:    validation windows are cut from the held-out tokens when val_file is calib_file,
                 otherwise from the start of val_file
    train_files: every file is cut into windows of train_seqlen; a file that is also val_file only
                 contributes the tokens *before* its validation region (for WikiText: the
                 calibration tokens), so recovery never trains on validation text.

Training batches are [B, train_seqlen] id tensors in a seeded order (a permutation per epoch,
``seed + epoch``). The training loader is resumable: a checkpoint records (epoch, batches done) and
a resumed run skips exactly those batches, so it sees the same batches as an uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from flatten_lightning.checks import check_seqlen
from flatten_lightning.data import (
    HELD_OUT_STARTS,
    calibration_shares,
    check_distinct,
    held_out_ids,
    interleaved_windows,
    read_text,
    tokenize,
)
from flatten_lightning.perplexity import windows


class Windows(Dataset):
    """Rows of an [N, T] id tensor; item i is the 1-D window ``ids[i]`` [T]."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i]


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded per-epoch permutation, able to skip batches already trained on.

    A ``DistributedSampler`` (also for one process) so that Lightning leaves it in place under DDP.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int, epoch: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.epoch = epoch
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip in that epoch)

    def resume(self, epoch: int, batches: int) -> None:
        self.epoch = epoch  # Lightning builds the first iterator before it calls set_epoch
        self._resume = (epoch, batches)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if epoch == self.epoch:
                indices = indices[batches * self.batch_size :]
        return iter(indices)


class ResumableLoader(DataLoader):
    """A DataLoader whose position (epoch, batches done) Lightning saves in checkpoints and restores.

    ``position`` returns what the trainer has actually consumed; counting yielded batches here would
    be wrong because Lightning prefetches one batch ahead.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, position: Callable[[], tuple[int, int]], **kw):
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, **kw)
        self.position = position

    def state_dict(self) -> dict:
        epoch, batches = self.position()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["batches"]))


def resumable_train_loader(dm: LightningDataModule, rows: torch.Tensor, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    """Training batches of ``rows`` [M, ...] for ``dm``'s trainer: this rank's share of a seeded order, resumable."""
    trainer = dm.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
    if len(rows) < world * batch_size:
        raise ValueError(f"{len(rows)} training rows are fewer than one batch of {batch_size} on each of {world} devices")
    # The epoch Lightning is about to run (restored from a checkpoint already when resuming).
    epoch = trainer.fit_loop.epoch_progress.current.processed if trainer else 0

    def position() -> tuple[int, int]:
        loop = trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    sampler = ResumableSampler(Windows(rows), batch_size, world, rank, seed, epoch)
    return ResumableLoader(Windows(rows), sampler, position, num_workers=num_workers)


def calibration_rows(rows: torch.Tensor, rank: int, world: int, what: str) -> torch.Tensor:
    """This rank's calibration rows: rank, rank + world, ... of ``rows`` (all ranks together: all of them)."""
    if len(rows) < world:
        raise ValueError(f"{len(rows)} calibration {what} cannot be shared by {world} ranks. Fix: raise calib_samples.")
    return rows[rank::world]


def _same_file(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def _check_file(path: str, role: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role} file {path} does not exist. Fix: pass an existing .txt, .jsonl or .json file.")


class FlattenDataModule(LightningDataModule):
    """Token windows for calibration (FlattenCallback), recovery training and validation.

    The tokenizer is the model's: ``setup`` takes it from ``trainer.lightning_module.tokenizer``
    (or call ``prepare(tokenizer)`` directly outside a Trainer).

    Args:
        calib_file: calibration text (paper: WikiText-2 train), or a list of texts giving windows in turn.
        calib_samples: calibration windows N (paper: 128).
        calib_seqlen: tokens per calibration window T (paper: 2048).
        train_files: recovery texts (paper: cleaned Alpaca); empty = no recovery data (compression only).
        train_seqlen: tokens per training window.
        train_max_windows: keep only the first this many training windows (None = all).
        val_file: validation text (None = the first calib_file, after its calibration tokens).
        val_windows: validation windows (None = every full window of the held-out text).
        val_seqlen: tokens per validation window.
        val_start: where the validation text starts in val_file: right after its calibration tokens ("tokens"), or at
            the first WikiText article after them ("article": none shared with the calibration windows).
        batch_size: training windows per step per device.
        eval_batch_size: validation windows per forward.
        seed: seed of the training order.
        num_workers: DataLoader workers (windows are in memory: 0 is usually right).
    """

    def __init__(
        self,
        calib_file: str | list[str],
        calib_samples: int = 128,
        calib_seqlen: int = 2048,
        train_files: list[str] | None = None,
        train_seqlen: int = 512,
        train_max_windows: int | None = None,
        val_file: str | None = None,
        val_windows: int | None = 16,
        val_seqlen: int = 512,
        val_start: str = "tokens",
        batch_size: int = 4,
        eval_batch_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        # Checked here, i.e. when the CLI builds the objects: before the model loads or any work starts.
        calib_files = [calib_file] if isinstance(calib_file, str) else list(calib_file)
        for f in calib_files:
            _check_file(f, "calibration")
        check_distinct(calib_files)
        self.calib_shares = calibration_shares(calib_samples, len(calib_files))  # windows per file; fails early on too few
        for f in train_files or []:
            _check_file(f, "training")
        if val_file is not None:
            _check_file(val_file, "validation")
        if val_start not in HELD_OUT_STARTS:
            raise ValueError(f"val_start must be one of {HELD_OUT_STARTS}, got {val_start!r}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        self.save_hyperparameters()
        self.calib_files, self.calib_samples, self.calib_seqlen = calib_files, calib_samples, calib_seqlen
        self.train_files = list(train_files or [])
        self.train_seqlen, self.train_max_windows = train_seqlen, train_max_windows
        self.val_file = val_file or calib_files[0]
        self.val_windows, self.val_seqlen, self.val_start = val_windows, val_seqlen, val_start
        self.batch_size, self.eval_batch_size, self.seed, self.num_workers = batch_size, eval_batch_size, seed, num_workers
        self.calibration: torch.Tensor | None = None  # [N, calib_seqlen]
        self.validation_ids: torch.Tensor | None = None  # 1-D held-out tokens; windows cut with val_seqlen
        self.train: torch.Tensor | None = None  # [M, train_seqlen]
        self._prepared = False

    # ------------------------------------------------------------------------------ tokenization
    def setup(self, stage: str) -> None:
        if self._prepared:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("FlattenDataModule needs the model's tokenizer: the LightningModule has no `tokenizer` attribute")
        model = getattr(module, "model", None)
        if model is not None and hasattr(model, "config"):  # windows longer than the model's positions would run silently
            for name in ("calib_seqlen", "train_seqlen", "val_seqlen"):
                check_seqlen(model, getattr(self, name), f"data.{name}")
        self.prepare(tokenizer)

    def prepare(self, tokenizer) -> None:
        """Read and tokenize every file once and cut the calibration, validation and training windows."""
        cache: dict[str, tuple[str, torch.Tensor]] = {}

        def text_and_ids(path: str) -> tuple[str, torch.Tensor]:
            key = os.path.realpath(path)
            if key not in cache:
                text = read_text(path)
                cache[key] = (text, tokenize(tokenizer, text))
            return cache[key]

        def ids_of(path: str) -> torch.Tensor:
            return text_and_ids(path)[1]

        streams = [ids_of(f) for f in self.calib_files]
        self.calibration = interleaved_windows(streams, self.calib_samples, self.calib_seqlen, self.calib_files)
        val_calib = self._windows_taken_from(self.val_file)
        val_start = val_calib * self.calib_seqlen  # training never reads val_file from here on
        val_text, val_ids = text_and_ids(self.val_file)
        self.validation_ids = held_out_ids(tokenizer, val_text, val_start, self.val_start, val_ids)
        windows(self.validation_ids, self.val_seqlen, self.val_windows)  # fails early if too short
        parts = []
        for f in self.train_files:
            ids = ids_of(f)
            if _same_file(f, self.val_file):
                ids = ids[:val_start]  # only the tokens before the validation region
            n = ids.numel() // self.train_seqlen
            if n == 0:
                raise ValueError(
                    f"training file {f} gives no window of {self.train_seqlen} tokens"
                    + (" outside its validation region" if _same_file(f, self.val_file) else "")
                    + ". Fix: lower train_seqlen or use a longer text."
                )
            parts.append(ids[: n * self.train_seqlen].view(n, self.train_seqlen))
        if parts:
            train = torch.cat(parts)
            self.train = train[: self.train_max_windows] if self.train_max_windows else train
        self._prepared = True

    def _windows_taken_from(self, path: str) -> int:
        """Calibration windows cut from the start of ``path`` (0 when it is not a calibration file)."""
        return next((m for f, m in zip(self.calib_files, self.calib_shares, strict=True) if _same_file(f, path)), 0)

    # ------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        if self.train is None:
            raise ValueError(
                "no recovery data: set data.train_files. Compression runs inside fit, so even a "
                "compression-only run needs training text for one step (use lr 0 to leave the weights as compressed)."
            )
        return resumable_train_loader(self, self.train, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.validation_ids is not None
        val = windows(self.validation_ids, self.val_seqlen, self.val_windows)
        return DataLoader(Windows(val), batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    # ---------------------------------------------------------------------------------- for callbacks
    def calibration_shard(self, rank: int, world: int) -> torch.Tensor:
        """This rank's calibration windows [N_r, T]: rows rank, rank + world, ... (all ranks together: all N)."""
        assert self.calibration is not None, "call setup/prepare first"
        return calibration_rows(self.calibration, rank, world, "windows")

    def describe(self) -> dict:
        """What the report records about the data."""
        return {
            "calibration": {
                "files": self.calib_files,
                "windows_per_file": self.calib_shares,
                "samples": self.calib_samples,
                "seqlen": self.calib_seqlen,
                "tokens": self.calib_samples * self.calib_seqlen,
            },
            "train": {"files": self.train_files, "seqlen": self.train_seqlen, "windows": 0 if self.train is None else len(self.train)},
            "validation": {
                "file": self.val_file,
                "seqlen": self.val_seqlen,
                "windows": self.val_windows,
                "after_calibration_tokens": self._windows_taken_from(self.val_file) * self.calib_seqlen,
                "start": self.val_start,
            },
        }
