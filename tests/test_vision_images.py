"""ImageNet preprocessing of image folders: shapes, normalisation, crop geometry and clear errors."""

import os

import pytest
import torch
from conftest import DATA
from PIL import Image

from flatten_lightning.vision.images import IMAGENET_MEAN, IMAGENET_STD, list_images, load_image, load_image_folder, preprocess

IMAGES = os.path.join(DATA, "imagenet-sample")


def test_real_folder_gives_normalised_224_crops():
    paths = list_images(IMAGES)
    assert len(paths) == 500 and paths == sorted(paths) and paths[0].name == "n01440764_tench.jpg"
    x = load_image_folder(IMAGES, limit=3)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    assert -2.2 < x.min() < -1.0 and 1.5 < x.max() < 2.7  # inside (0 - mean)/std .. (1 - mean)/std, not raw pixels


def test_constant_colour_maps_to_its_normalised_value():
    rgb = (255, 128, 0)
    x = preprocess(Image.new("RGB", (300, 260), rgb))
    expected = [(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)]
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_shorter_side_is_resized_to_256_then_centre_cropped():
    # A 512 x 1024 image: the left half black, the right half white. Resized to 256 x 512, the centre crop
    # covers columns 144..368, so the black/white edge (column 256) sits 112 columns into the crop.
    image = Image.new("L", (1024, 512), 0)
    image.paste(255, (512, 0, 1024, 512))
    x = preprocess(image)
    red = x[0, 100]  # one row of the red channel
    assert red[:110].max() < -2.0 and red[114:].min() > 2.0


def test_greyscale_images_become_three_channels(tmp_path):
    Image.new("L", (256, 256), 77).save(tmp_path / "grey.png")
    x = load_image(tmp_path / "grey.png")
    assert x.shape == (3, 224, 224)
    assert not torch.allclose(x[0], x[1])  # the same grey normalises differently per channel


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .*nope does not exist"):
        list_images(tmp_path / "nope")


def test_folder_without_images_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image files"):
        load_image_folder(tmp_path)


def test_undecodable_image_names_the_file(tmp_path):
    Image.new("RGB", (256, 256)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*b.jpg"):
        load_image_folder(tmp_path)


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_image_folder(IMAGES, limit=0)
