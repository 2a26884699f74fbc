"""SLEB on vision backbones, scored by feature disagreement with the dense model: each greedy step equals
brute force (remove a block, run the stock HF forward, 1 - mean token cosine of last_hidden_state)."""

import copy

import pytest
import torch
from torch.nn.functional import cosine_similarity
from vision_helpers import features, make_tiny_vision, pixels

from flatten_lightning import baselines as B
from flatten_lightning.adapters import get_adapter
from flatten_lightning.methods import compress_with
from flatten_lightning.vision.agreement import FeatureDisagreement
from flatten_lightning.vision.compress import vision_method_kwargs


def _without(model, drop: list[int]):
    m = copy.deepcopy(model)
    ad = get_adapter(m)
    blocks = list(ad.blocks())
    keep = [i for i in range(len(blocks)) if i not in drop]
    ad.install([blocks[i] for i in keep], [[i] for i in keep])
    return m


def _disagreement(model, ref: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return 1.0 - cosine_similarity(features(model, x), ref, dim=-1).mean().item()


@pytest.mark.parametrize("kind", ["dinov2", "deit"])
def test_sleb_by_feature_disagreement_equals_brute_force_greedy(kind):
    model = make_tiny_vision(kind)
    dense = copy.deepcopy(model)
    x = pixels(4)
    ref = features(dense, x)
    info = B.sleb(model, x, 3, score=FeatureDisagreement.of_dense(model, x), progress=False)
    assert info["scored_by"] == "FeatureDisagreement"
    removed: list[int] = []
    for step in info["steps"]:
        alive = [i for i in range(5) if i not in removed]
        brute = {j: _disagreement(_without(dense, removed + [j]), ref, x) for j in alive}
        assert step["scores"] == pytest.approx(brute, abs=1e-10)
        assert step["removed"] == min(brute, key=brute.get) and step["score"] == pytest.approx(min(brute.values()), abs=1e-10)
        removed.append(step["removed"])
    assert info["removed"] == removed
    assert torch.allclose(features(model, x), features(_without(dense, removed), x), atol=1e-12)


def test_vision_kwargs_score_sleb_on_the_scored_images_only():
    model = make_tiny_vision("vit")
    dense = copy.deepcopy(model)
    x = pixels(5)
    kw = vision_method_kwargs("sleb", model, x, {"score_ids": x[:2], "progress": False})
    assert vision_method_kwargs("shortgpt", model, x, {"progress": False}) == {"progress": False}
    r = compress_with("sleb", model, x, 4, **kw)
    j = r.info["removed"][0]
    assert r.info["steps"][0]["score"] == pytest.approx(_disagreement(_without(dense, [j]), features(dense, x[:2]), x[:2]), abs=1e-10)
    assert r.layers == 4 and r.exportable


def test_feature_disagreement_refuses_other_images():
    model = make_tiny_vision("vit")
    score = FeatureDisagreement.of_dense(model, pixels(2))
    with pytest.raises(ValueError, match="score the same images"):
        score(torch.zeros(3, 17, 24, dtype=torch.float64))
