"""One registry of depth-compression methods, for the CLI, the Lightning callback and the benchmarks.

``flatten`` (ours) and ``flatten-paper`` (the paper's recipe) are FlattenGPT (``compress.flatten_gpt``)
with two ``CompressConfig`` recipes; the peers live in ``baselines``. Every method compresses a model
in place to ``target_layers`` blocks and returns a JSON-able record (a ``Plan`` dict for the flatten
methods, which ``compress.rebuild_structure`` can replay).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from flatten_lightning import baselines
from flatten_lightning.adapters import get_adapter
from flatten_lightning.compress import CompressConfig, flatten_gpt
from flatten_lightning.export import count_parameters

# The methods that run flatten_gpt with a CompressConfig (the others are peers in ``baselines``).
FLATTEN_METHODS = ("flatten", "flatten-paper")
# Every CompressConfig field a caller may set (the depth is the method's own argument).
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(CompressConfig)) - {"target_layers"}
# CompressConfig fields that make up a recipe: flatten-paper fixes them, flatten lets a user set them.
RECIPE_FIELDS = (
    "correction",
    "refit_attention",
    "leverage_lambda",
    "fit_ridge",
    "ridge_prior",
    "feedback",
    "ridge_floor",
    "refit_passes",
    "head_score",
    "channel_score",
    "candidates",
    "fast",
    "input_fit",
)


def compress_config(method: str, target_layers: int, **settings: Any) -> CompressConfig:
    """The ``CompressConfig`` of a flatten method with ``settings`` (CompressConfig fields) applied.

    ``flatten-paper`` is the paper's recipe: giving it a recipe field is an error rather than a
    silent change of what the name promises.
    """
    if method not in FLATTEN_METHODS:
        raise ValueError(f"{method!r} is not a FlattenGPT method ({', '.join(FLATTEN_METHODS)})")
    unknown = sorted(set(settings) - CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown compression setting(s) {', '.join(unknown)}; known: {', '.join(sorted(CONFIG_FIELDS))}")
    if method == "flatten-paper":
        fixed = sorted(set(settings) & set(RECIPE_FIELDS))
        if fixed:
            raise ValueError(
                f"method flatten-paper is the paper's recipe and fixes {', '.join(fixed)}. Fix: use method flatten to set them."
            )
        return dataclasses.replace(CompressConfig.paper(target_layers), **settings)
    # Our levers that need the sequential target / the o_proj refit step aside when the user turns those off.
    if settings.get("correction") == "flattened":
        settings = {"feedback": 0.0, "refit_passes": 0, **settings}
    if settings.get("refit_attention") is False:
        settings = {"head_score": "importance", **settings}
    return CompressConfig(target_layers, **settings)


def _flatten(method: str) -> Callable[..., dict[str, Any]]:
    def run(
        model: PreTrainedModel,
        calib_ids: torch.Tensor,
        target_layers: int,
        device: torch.device | str | None = None,
        progress: bool = True,
        **settings: Any,
    ) -> dict[str, Any]:
        return flatten_gpt(model, calib_ids, compress_config(method, target_layers, **settings), device, progress=progress).to_dict()

    return run


def _shortgpt(model: PreTrainedModel, calib_ids: torch.Tensor, target_layers: int, progress: bool = True, **kw: Any) -> dict[str, Any]:
    removed, influence = baselines.shortgpt(model, calib_ids, target_layers, **kw)
    return {"removed": removed, "block_influence": influence}


@dataclass(frozen=True)
class Method:
    """A compression method: its function and whether its result is a plain model of the family."""

    name: str
    run: Callable[..., dict[str, Any]]  # (model, calib_ids, target_layers, **kw) -> record; compresses in place
    exportable: bool  # every block keeps the config's widths: save_pretrained gives a plain HF model
    summary: str
    options: frozenset[str] = frozenset()  # keyword options beyond device, batch_size and progress


SETTINGS = CONFIG_FIELDS - {"batch_size"}  # batch_size is an execution option every method takes
SCORING = frozenset({"score_ids"})  # score candidates on fewer tokens than the calibration set

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("flatten", _flatten("flatten"), True, "FlattenGPT, ours: sequential-target least-squares corrections", SETTINGS),
        Method("flatten-paper", _flatten("flatten-paper"), True, "FlattenGPT with the paper's recipe", SETTINGS),
        Method("shortgpt", _shortgpt, True, "drop the blocks of lowest block influence"),
        Method("sleb", baselines.sleb, True, "greedy block removal by calibration perplexity (or a given score)", SCORING | {"score"}),
        Method(
            "laco", baselines.laco, True, "layer collapse by parameter differences", frozenset({"merge_layers", "threshold", "interval"})
        ),
        Method("blockpruner", baselines.blockpruner, True, "greedy attention/MLP sub-block removal", SCORING | {"budget"}),
        Method(
            "flatten-noprune",
            baselines.flatten_noprune,
            False,
            "flattening without pruning (wider blocks)",
            frozenset({"groups", "max_group_size"}),
        ),
    )
}
METHODS: tuple[str, ...] = tuple(REGISTRY)
EXPORTABLE: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.exportable)


@dataclass
class MethodResult:
    """What a compression did: depth, stored parameters, whether a plain HF config can describe it."""

    method: str
    layers: int
    params: int  # stored parameters (tied embeddings once; zeroed sub-blocks included)
    params_active: int  # params minus sub-blocks that are stored but zeroed (BlockPruner)
    exportable: bool  # every block has the config's widths, so save_pretrained gives a plain HF model
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compress_with(method: str, model: PreTrainedModel, calib_ids: torch.Tensor, target_layers: int, **kw: Any) -> MethodResult:
    """Compress ``model`` in place to ``target_layers`` blocks with ``method`` (one of ``METHODS``).

    ``kw`` goes to the method: ``device``, ``batch_size`` and ``progress`` to every one; ``score_ids``
    to sleb and blockpruner; ``score`` (what to minimise, e.g. a vision backbone's feature disagreement)
    to sleb; ``merge_layers``, ``threshold``, ``interval`` to laco; ``budget`` to blockpruner; ``groups`` to flatten-noprune; ``CompressConfig`` fields to the flatten methods.
    """
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(kw) - {"device", "batch_size", "progress"} - REGISTRY[method].options)
    if unknown:
        raise ValueError(
            f"method {method} takes no option(s) {', '.join(unknown)}; it takes {', '.join(sorted(REGISTRY[method].options)) or 'none'}"
        )
    t0 = time.perf_counter()
    info = REGISTRY[method].run(model, calib_ids, target_layers, **kw)
    seconds = time.perf_counter() - t0
    params = count_parameters(model)
    zeroed = info.get("params_zeroed", 0) if method == "blockpruner" else 0
    return MethodResult(method, model.config.num_hidden_layers, params, params - zeroed, get_adapter(model).is_plain(), seconds, info)
