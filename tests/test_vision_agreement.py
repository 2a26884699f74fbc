"""Agreement metrics: known values on constructed inputs."""

import math

import pytest
import torch

from flatten_lightning.vision.agreement import FeatureDisagreement, cls_cosine, patch_cosine, saliency_pearson, top_fraction_mask, top_iou


def test_feature_cosines_separate_cls_and_patches():
    ref = torch.randn(2, 5, 8)
    tokens = ref.clone()
    tokens[:, 0] = -ref[:, 0]  # CLS flipped, patches equal
    assert math.isclose(cls_cosine(tokens, ref), -1.0, abs_tol=1e-12)
    assert math.isclose(patch_cosine(tokens, ref), 1.0, abs_tol=1e-12)
    tokens[:, 1] = 0.5 * ref[:, 1]  # a scaled token keeps its direction
    assert math.isclose(patch_cosine(tokens, ref), 1.0, abs_tol=1e-12)
    assert math.isclose(patch_cosine(tokens, ref, n_special=0), 0.6, abs_tol=1e-12)  # (-1 + 4) / 5


def test_pearson_is_invariant_to_affine_changes_and_flips_sign():
    ref = torch.rand(3, 1, 6, 6)
    assert math.isclose(saliency_pearson(2 * ref + 1, ref), 1.0, abs_tol=1e-12)
    assert math.isclose(saliency_pearson(-ref, ref), -1.0, abs_tol=1e-12)


def test_top_iou_counts_overlap_of_the_most_salient_pixels():
    ref = torch.arange(10.0).view(1, 1, 2, 5)  # top 20% = pixels 8, 9
    shifted = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 9, 10, 7.0]]).view(1, 1, 2, 5)  # top 20% = pixels 7, 8
    assert top_fraction_mask(ref, 0.2).sum() == 2
    assert math.isclose(top_iou(ref, ref), 1.0)
    assert math.isclose(top_iou(shifted, ref), 1 / 3)  # {7, 8} vs {8, 9}


def test_top_iou_refuses_a_bad_fraction():
    with pytest.raises(ValueError, match="fraction must be in"):
        top_iou(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), fraction=0.0)


def test_feature_disagreement_is_zero_for_the_dense_output_and_grows_with_change():
    norm = torch.nn.LayerNorm(8, eps=1e-12).double()  # eps this small: a scaled input normalises to the same
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    dense = torch.randn(2, 5, 8, dtype=torch.float64)
    score = FeatureDisagreement(norm, dense)
    assert abs(score(dense)) < 1e-12
    assert abs(score(3 * dense)) < 1e-12  # LayerNorm removes a scale
    small, large = score(dense + 0.1 * torch.randn_like(dense)), score(dense + torch.randn_like(dense))
    assert 0 < small < large
