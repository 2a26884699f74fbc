"""The FlattenGPT loop: pick the most similar adjacent blocks, flatten them, prune back, repeat.

Per step (docs/DESIGN.md 1.1-1.3): run the calibration set up to the chosen pair (block by block, from the
nearest block input kept by ``InputCache``), flatten the pair exactly, then fit the pruned block to a
target in streamed passes over that block (and the pair it came from) only:
  1. attention: (by default) the input fit of the parts' q/k/v rows (``fit_part_inputs``), head scores f_i,
     and (optionally) a ridge refit of o_proj on the kept heads;
  2. MLP: (by default) the input fit of the parts' gate/up rows, Gram C = psi^T psi of the 2I channels,
     selection of I channels, and the least-squares correction of down_proj.
The target is either the ORIGINAL blocks of the group run in sequence on the same input (default:
it absorbs the flattening error too) or the flattened block itself (the paper's closed form). The
similarities of the blocks from the merged one onward are then recomputed on the compressed model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from flatten_lightning import prune
from flatten_lightning.adapters import Affine, HeadLayout, Sub, get_adapter
from flatten_lightning.calibrate import (
    BlockRunner,
    InputCache,
    Reduce,
    check_finite,
    error_rows,
    global_count,
    global_tokens,
    io_similarities,
    no_reduce,
    on_device,
    parallel_error,
    token_cosine_sum,
)
from flatten_lightning.flatten import flatten_blocks

log = logging.getLogger(__name__)

Target = Literal["sequential", "flattened"]


@dataclass
class CompressConfig:
    """How to compress. ``paper()`` gives the paper's settings; the defaults are ours."""

    target_layers: int  # depth after compression (must be < current depth and >= 1)
    correction: Target = "sequential"  # fit target: original blocks in sequence, or the flattened block
    refit_attention: bool = True  # ridge refit of o_proj on the kept heads (paper: no correction)
    leverage_lambda: float = 10.0  # lambda for ridge leverage, times the mean eigenvalue of C (paper: 10)
    # Ridge of the least-squares corrections: a number is a fixed strength times the kept Gram's mean
    # eigenvalue; "gcv" picks it per fit by generalized cross-validation from the streamed statistics,
    # never below ridge_floor (GCV with the 0.1 floor chose exactly the floor in all 22 fits of SmolLM2 and
    # Qwen2.5 at 20%); "cv" per fit by cross-validation over cv_folds folds of whole calibration windows
    # (prune.cv_ridge: a window's tokens stay together, which GCV's rows do not); "leverage" reuses the
    # leverage lambda (the paper's single lambda). None = "cv", or 0.1 in fast mode or with fewer
    # calibration windows than cv_folds (ridge_for). Measured (20% depth, one CLI run each): cv against a fixed 0.1,
    # SmolLM2 24.95 -> 24.51, Qwen2.5-Coder 21.84 -> 21.73 (same groups; CV chose 0.18-1.0 there), for
    # 2.3x the compression time on Qwen2.5 (K eigendecompositions of each fit's kept Gram).
    fit_ridge: float | Literal["gcv", "cv", "leverage"] | None = None
    cv_folds: int = 4  # with fit_ridge="cv": window i of the whole calibration set is in fold i mod cv_folds
    ridge_prior: Literal["flattened", "zero"] = "flattened"  # what the ridge shrinks towards (paper: zero)
    max_group_size: int = 0  # most original blocks one new block may hold (0 = no limit)
    batch_size: int = 4  # calibration sequences per forward
    offload: bool = False  # keep blocks on the CPU and move each to the device only while it works
    # Keep the input of every input_stride-th block on the CPU, so reaching a pair re-runs at most
    # input_stride - 1 blocks instead of the whole prefix (memory: depth / input_stride hidden-state
    # sets of N x T x D). None = ceil(sqrt(depth)); 0 = keep none (re-run from the embeddings).
    input_stride: int | None = None
    # Error feedback: the MLP correction's output target moves this fraction of the way from the group's
    # original blocks run on the compressed input towards the dense model's hidden state after the group,
    # so the fit also undoes error that earlier merges left (0 = off; needs the sequential target).
    # Measured (benchmarks/ablate.py, SmolLM2 30 -> 24): 1.0 lowers held-out perplexity 3.5%, 0.5 2.6%.
    feedback: float = 1.0
    # Least relative ridge GCV may choose (fit_ridge="gcv"): tokens of one window are correlated, which
    # GCV (made for independent rows) does not see, so it under-regularises (0 = no floor). Measured: 0.1
    # lowers held-out perplexity 2.3% against GCV alone.
    ridge_floor: float = 0.1
    # After the last merge, re-fit o_proj and down_proj of every merged block, front to back, on the
    # final compressed model's inputs (the kept heads and channels stay). 0 = off.
    refit_passes: int = 0
    # How to score heads: "importance" (the paper's f_i), "leverage" (ridge leverage of the head outputs,
    # as for MLP channels: the o_proj refit can only use what the kept heads span; needs refit_attention) or
    # "loss" (prune.select_by_loss: drop the KV groups whose loss the refit minds least, target included).
    # Measured: leverage lowers it 6.8%; with feedback 1 and the 0.1 floor, 10.9%. "loss" (with channels by
    # loss) against leverage: SmolLM2 24.79 against 24.95, Qwen2.5 22.55 against 21.84 (its trials then chose
    # a tail pair): leverage stays the default.
    head_score: Literal["importance", "leverage", "loss"] = "leverage"
    # How to score MLP channels: "leverage" (ridge leverage under the 2I x 2I Gram C, the paper's Nystrom
    # selection), "energy" (sqrt(E[psi_j^2]) ||W_down[:, j]||: only C's diagonal, then the kept channels'
    # Gram in a second pass; no 2I x 2I Gram nor its factorisation; needs the sequential target) or "loss"
    # (backward elimination under the down_proj fit's own objective, prune.select_by_loss: a channel the
    # target does not need, or whose output others reproduce, goes first; the leverage sees only the span).
    # None = "energy" in fast mode (the 2I Gram is most of Qwen2.5's cost), "loss" otherwise. Measured
    # against leverage (20% depth, same groups chosen): SmolLM2 25.16 -> 24.95, Qwen2.5 21.96 -> 21.84, for
    # 25% more compression time on Qwen2.5 (its 9,728 x 9,728 Gram downdated in 24 rounds per fit).
    channel_score: Literal["leverage", "energy", "loss"] | None = None
    # Pairs tried per step: the n most similar admissible pairs are each flattened, pruned and fitted,
    # and the one whose model ends nearest the dense model's last hidden state (token cosine) is kept;
    # in fast mode they are compared by their parallel error instead and only the chosen one is fitted
    # (calibrate.parallel_error, one block run on a quarter of the windows each). 1 = the most similar
    # pair, no trial. Measured (20% depth, one run each): 3 lowers held-out perplexity 14.8% on Qwen2.5-Coder-0.5B
    # (25.79 -> 21.96: the tail blocks' inputs are alike but flattening them costs the most) and 1.1% on
    # SmolLM2 (25.44 -> 25.16), for about 3x the compression time.
    candidates: int = 3
    # Trials score each candidate on windows its fit did not see: every trial_holdout-th window of a rank is
    # held out of the candidate's fit and its final error measured on those only (the tail runs on them
    # alone); the chosen pair is then fitted again on every window. A correction fitted on the windows it is
    # scored on favours the candidate whose fit over-fits them most (the tail merges on Qwen2.5). 0 = fit and
    # score on every window. Needs at least trial_holdout windows per rank. Measured (SmolLM2, 32 x 512,
    # trial_holdout 4): 25.91 held-out perplexity against 25.16, other groups; so it is off. With the ridge by
    # cross-validation it picks the default's groups: the same model, bit for bit (SmolLM2, 2026-12-02).
    trial_holdout: int = 0
    # Fast mode: after a merge, measure the similarity of the merged block only (one block run) and keep
    # the later blocks' similarities as they were, instead of re-measuring every block after it on the
    # compressed model (the largest cost after the fits: about 2 of 6.7 calibration forwards on SmolLM2);
    # later pairs are fitted on their inputs from before the merge (kept, not recomputed: with error
    # feedback a merged block reproduces the dense hidden state, so they move little); and MLP channels
    # are scored by energy unless channel_score says otherwise.
    fast: bool = False
    # Input fit: before the heads and channels are chosen, re-fit each flattened part's input-side rows (q/k/v of
    # the parts after the first, gate/up of every part) so that, as a linear function of the shared normalised
    # input, its pre-activations are what the part computed when the parts ran in sequence (fit_part_inputs):
    # it repairs the parallel approximation before the softmax and the activation, which the o/down fits cannot
    # reach. None = on, except in fast mode (two more runs of the parts per fit). Measured (SmolLM2 30 -> 24,
    # the default's groups fixed, 8 x 2048 article-disjoint windows): 28.20 -> 27.42 (-2.8%); attention only -0.9%.
    # Through the trials (same groups): SmolLM2 24.51 -> 23.94, Qwen2.5-Coder 21.73 -> 21.42 on the bench's windows.
    input_fit: bool | None = None
    # Fixed merges: runs of adjacent original block indices, each run to become one block (e.g. a plan's
    # ``groups``; singletons may be left out). Set, the pairs within each run merge most similar first and
    # no other pair is tried (no candidate trials): the same groups fitted on other calibration text, or
    # with other settings. None = chosen by similarity and trials.
    groups: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.feedback <= 1.0:
            raise ValueError(f"feedback must be in [0, 1] (a fraction of the error to undo), got {self.feedback}")
        if (self.feedback or self.refit_passes) and self.correction != "sequential":
            raise ValueError("feedback and refit_passes fit to the original blocks. Fix: use correction='sequential' or set them to 0.")
        if self.head_score in ("leverage", "loss") and not self.refit_attention:
            raise ValueError(
                f"head_score={self.head_score!r} chooses heads for the o_proj refit. Fix: set refit_attention=True or use 'importance'."
            )
        if self.head_score not in ("importance", "leverage", "loss"):
            raise ValueError(f"head_score must be 'importance', 'leverage' or 'loss', got {self.head_score!r}")
        if self.channel_score not in (None, "leverage", "energy", "loss"):
            raise ValueError(f"channel_score must be 'leverage', 'energy' or 'loss', got {self.channel_score!r}")
        if self.channel_score == "energy" and self.correction != "sequential":
            raise ValueError("channel_score='energy' fits the kept channels to the original blocks. Fix: use correction='sequential'.")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1 (pairs tried per step), got {self.candidates}")
        if self.trial_holdout == 1 or self.trial_holdout < 0:
            raise ValueError(f"trial_holdout must be 0 (off) or >= 2 (every n-th window held out), got {self.trial_holdout}")
        if isinstance(self.fit_ridge, str) and self.fit_ridge not in ("gcv", "cv", "leverage"):
            raise ValueError(f"fit_ridge must be a number >= 0, 'gcv', 'cv', 'leverage' or None, got {self.fit_ridge!r}")
        if self.fit_ridge in ("cv", None) and self.cv_folds < 2:
            raise ValueError(
                f"fit_ridge='cv' (the default when None) needs cv_folds >= 2, got {self.cv_folds}. Fix: pass cv_folds=4 (the default)."
            )
        if self.groups is not None:
            merge_runs(self.groups)
            if self.max_group_size and any(len(g) > self.max_group_size for g in self.groups):
                raise ValueError(
                    f"groups {self.groups} hold a run longer than max_group_size={self.max_group_size}. Fix: shorten it or raise the limit."
                )
        if self.refit_passes < 0 or self.ridge_floor < 0:
            raise ValueError(f"refit_passes and ridge_floor must be >= 0, got {self.refit_passes} and {self.ridge_floor}")

    def ridge_for(self, windows: int | None = None) -> float | str:
        """The corrections' ridge in use: ``fit_ridge``, or by default "cv", except in fast mode (one fit per
        step is its point) or with fewer than ``cv_folds`` calibration ``windows`` in all (a fold would hold
        none out), where it is the fixed 0.1. ``windows=None``: not known here, enough assumed."""
        if self.fit_ridge is not None:
            return self.fit_ridge
        return 0.1 if self.fast or (windows is not None and windows < self.cv_folds) else "cv"

    @property
    def fits_inputs(self) -> bool:
        """Whether the parts' input-side rows are fitted: ``input_fit``, or by default everywhere but fast mode."""
        return self.input_fit if self.input_fit is not None else not self.fast

    @property
    def channels_by(self) -> str:
        """The MLP channel score in use: ``channel_score``, or by default energy in fast mode (sequential target), else loss."""
        if self.channel_score is not None:
            return self.channel_score
        return "energy" if self.fast and self.correction == "sequential" else "loss"

    @classmethod
    def paper(cls, target_layers: int, **kw) -> CompressConfig:
        """The paper's recipe: flattened-block target, no o_proj refit, one lambda for both steps, heads by importance."""
        return cls(
            target_layers,
            correction="flattened",
            refit_attention=False,
            fit_ridge="leverage",
            ridge_prior="zero",
            feedback=0.0,
            ridge_floor=0.0,
            head_score="importance",
            channel_score="leverage",
            candidates=1,
            input_fit=False,
            **kw,
        )


@dataclass
class Step:
    """One flatten-and-prune step of the plan (indices are into the flattened 2H heads / 2I channels)."""

    position: int  # index of the first block of the pair in the model at the time of the step
    members: list[int]  # original block indices the new block holds
    similarity: float  # cos of the two current blocks' inputs that made this pair the choice
    kept_kv_groups: list[int]
    kept_channels: list[int]
    ridge: dict = field(default_factory=dict)  # relative ridge of the o_proj / down_proj fits (and of the input fits)
    seconds: float = 0.0
    candidates: list = field(default_factory=list)  # [position, final error (fast: parallel error)] of each pair tried


@dataclass
class Plan:
    """The compression plan: data enough to rebuild the compressed structure from the dense model."""

    original_layers: int
    steps: list[Step] = field(default_factory=list)
    initial_similarities: list[float] = field(default_factory=list)  # cos(in_j, out_j) of the dense model
    config: dict = field(default_factory=dict)

    @property
    def groups(self) -> list[list[int]]:
        """For each block of the compressed model, the original blocks it holds."""
        groups = [[i] for i in range(self.original_layers)]
        for s in self.steps:
            groups[s.position : s.position + 2] = [groups[s.position] + groups[s.position + 1]]
        return groups

    def to_dict(self) -> dict:
        return {
            "original_layers": self.original_layers,
            "groups": self.groups,
            "steps": [asdict(s) for s in self.steps],
            "initial_similarities": self.initial_similarities,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(
            d["original_layers"], [Step(**s) for s in d["steps"]], list(d.get("initial_similarities", [])), dict(d.get("config", {}))
        )


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [tokens, D] in t's precision, float32 at least (float64 stays float64).

    Statistics are float64 sums of per-batch products computed in this precision: a float32 product is
    ~1e-7 relative per batch and twice as fast on a CPU as a float64 one (held-out perplexity of SmolLM2
    30 -> 24 unchanged to 6 digits; with the Cholesky leverage, compression 6.7 -> 5.0 calibration forwards).
    """
    rows = t.reshape(-1, t.shape[-1])
    return rows.to(torch.promote_types(rows.dtype, torch.float32))


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b [p, q] of rows a [n, p], b [n, q] (``as_rows``), as a float64 term of a streamed sum."""
    return (a.T @ b).double()


def folds_of(cfg: CompressConfig) -> int:
    """How many folds the statistics of a fit are kept in: cv_folds with fit_ridge="cv", else 1 (one sum)."""
    return cfg.cv_folds if cfg.ridge_for() == "cv" else 1


def add_stats(
    gram: torch.Tensor,
    cross: torch.Tensor | None,
    yy: torch.Tensor,
    a: torch.Tensor,
    y: torch.Tensor | None,
    first: int,
    t: int,
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Add one batch's statistics, per fold: gram[f] += A_w^T A_w, cross[f] += A_w^T Y_w, yy[f] += ||Y_w||^2.

    ``a`` [B t, n] and ``y`` [B t, D] are ``as_rows`` of B windows of t tokens, the first of them window
    ``first`` of the rank. Window i of rank r of ``shard`` = (r, world) is window g = r + world i of the whole
    set, in fold g mod K (K = len(gram)): the folds do not depend on how many ranks share the windows.
    K = 1 sums the batch in one product.
    """
    k, (rank, world) = len(gram), shard
    for j in range(0, len(a), t if k > 1 else len(a)):
        f = (rank + world * (first + j // t)) % k
        aw = a[j : j + t] if k > 1 else a
        gram[f] += product(aw, aw)
        if y is not None:
            yw = y[j : j + t] if k > 1 else y
            cross[f] += product(aw, yw)
            yy[f] += yw.double().pow(2).sum()


def total(stats: torch.Tensor) -> torch.Tensor:
    """The sum over folds of per-fold statistics [K, ...] (a view when K = 1)."""
    return stats[0] if len(stats) == 1 else stats.sum(dim=0)


class _Capture:
    """Forward pre-hook that records a module's input (returns None so the input is unchanged)."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def close(self) -> None:
        self.handle.remove()


@torch.no_grad()
def sequential_targets(runner: BlockRunner, originals: list[nn.Module], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the group's original blocks in sequence on ``h`` [N, T, D].

    Returns (attention target, output target): the sum of the blocks' attention contributions
    A_a(h) + A_b(h_1) + ..., and the last block's output (the next block's input). Each block is run
    as its two branches, u = h + A(h), out = u + M(u): the same operations as its own forward.
    """
    ad = runner.adapter
    attn_sum = torch.zeros_like(h, dtype=torch.promote_types(h.dtype, torch.float32))  # sums of bf16 terms drift
    for i, block in enumerate(originals):

        def branches(s: slice, x: torch.Tensor, ctx: dict, block: nn.Module = block) -> torch.Tensor:
            a = ad.attention(block, x, ctx)
            attn_sum[s] += a.to(attn_sum.dtype)
            u = x + a
            return u + ad.mlp(block, u)

        h = runner.map_batches(block, h, branches, f"original block {i} of the group")
    return attn_sum, h


@torch.no_grad()
def part_inputs(runner: BlockRunner, parts: list[nn.Module], h: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """What each part read when ``parts`` ran in sequence on ``h`` [N, T, D], less its norms' shifts.

    Returns {"attn": [g_j n(h_j) for parts j >= 1], "mlp": [g'_j n(u_j) for every part j]} ([N, T, D] each): h_j is
    the output of the parts before j, u_j = h_j + A_j(h_j). One part on the device at a time (offload).
    """
    ad, out = runner.adapter, {"attn": [], "mlp": []}
    for j, part in enumerate(parts):
        w = ad.read(part)
        seen = {"attn": torch.empty_like(h), "mlp": torch.empty_like(h)}

        def fn(s: slice, x: torch.Tensor, ctx: dict, part: nn.Module = part, seen: dict = seen) -> torch.Tensor:
            seen["attn"][s] = ad.norm_of(part, "attn")(x)
            u = x + ad.attention(part, x, ctx)
            seen["mlp"][s] = ad.norm_of(part, "mlp")(u)
            return u + ad.mlp(part, u)

        h = runner.map_batches(part, h, fn, f"part {j} of the flattened block")
        for sub, norm in (("attn", w.attn_norm), ("mlp", w.mlp_norm)):
            if sub == "mlp" or j > 0:
                out[sub].append(seen[sub] if norm.shift is None else seen[sub] - norm.shift.to(seen[sub]))
    return out


@torch.no_grad()
def fit_part_inputs(
    runner: BlockRunner,
    flat: nn.Module,
    parts: list[nn.Module],
    seen: list[torch.Tensor],
    h: torch.Tensor,
    sub: Sub,
    cfg: CompressConfig,
    reduce: Reduce,
) -> float | None:
    """Re-fit the input-side rows of each part of ``flat`` to what the part read when the parts ran in sequence.

    ``parts`` are the blocks flattened into ``flat``, in order; ``seen`` is ``part_inputs(...)[sub]``: x_j - b_j,
    what part j read before its attention (parts after the first) or its MLP (every part), less its norm's shift.
    In ``flat`` every part reads the shared n(phi), phi = h for "attn" and u = h + A_flat(h) for "mlp" (norms
    folded: unit scale, no shift). The ridge fit
        M = argmin_M ||X - N M^T||^2 + lam ||M - diag(g)||^2,   N rows n(phi), X rows x_j - b_j (all parts side by side),
    gives part j the rows W_j M_j (q/k/v or gate/up; W_j its own, before folding); lam -> inf keeps ``flat`` as
    flattened. Pre-activations then come as near the sequential ones as a linear map of the shared input brings
    them, before the softmax and the activation (the o/down fits act after them). Part 0's attention input is h:
    exact, not fitted. Returns the relative ridge (None when there is nothing to fit).
    """
    ad = runner.adapter
    first = 1 if sub == "attn" else 0
    if len(parts) <= first:
        return None
    ctx, k, d, dev = runner.context(h), folds_of(cfg), h.shape[-1], runner.device
    pw = [ad.read(p) for p in parts]
    norms = [w.attn_norm if sub == "attn" else w.mlp_norm for w in pw][first:]
    gram = torch.zeros(k, d, d, dtype=torch.float64, device=dev)
    cross = torch.zeros(k, d, d * len(norms), dtype=torch.float64, device=dev)
    yy = torch.zeros(k, dtype=torch.float64, device=dev)
    for s in runner.batches(len(h)):
        phi = h[s] if sub == "attn" else h[s] + ad.attention(flat, h[s], ctx)
        y = torch.cat([as_rows(t[s]) for t in seen], dim=1)
        add_stats(gram, cross, yy, as_rows(ad.norm_of(flat, sub)(phi)), y, s.start, h.shape[1], runner.shard)
    gram, cross, yy = reduce(gram), reduce(cross), reduce(yy)
    prior = torch.cat([torch.diag(n.scale.double().to(dev)) for n in norms])  # [parts D, D]: the flattened rows
    m, ridge = _fit(
        total(gram),
        total(cross),
        float(yy.sum()),
        int(global_tokens(h, reduce)),
        replace(cfg, ridge_prior="flattened"),
        prior,
        folds=(gram, cross, yy) if k > 1 else None,
    )
    w = ad.read(flat)
    for name in ("q", "k", "v") if sub == "attn" else ("gate", "up"):
        if getattr(w, name) is None:
            continue
        weight, row = getattr(w, name).weight.clone(), 0
        for j, part_w in enumerate(pw):
            raw = getattr(part_w, name).weight
            if j >= first:
                weight[row : row + len(raw)] = (raw.double() @ m[(j - first) * d : (j - first + 1) * d].to(raw.device)).to(weight)
            row += len(raw)
        w = w.with_(**{name: Affine(weight, getattr(w, name).bias)})
    ad.write(flat, w)
    return ridge


@torch.no_grad()
def prune_attention_stage(
    runner: BlockRunner,
    flat: nn.Module,
    h: torch.Tensor,
    attn_target: torch.Tensor | None,
    layout: HeadLayout,
    cfg: CompressConfig,
    reduce: Reduce,
) -> tuple[list[int], float | None]:
    """Score the 2H heads of ``flat`` on ``h``, keep K KV groups, refit o_proj.

    Returns the kept KV groups and the relative ridge of the refit (None without refit).

    ``attn_target`` [N, T, D] is the attention output to fit (None: the flattened attention itself).
    """
    ad = runner.adapter
    o = ad.o_module(flat)
    n_heads = o.in_features // layout.head_dim
    ctx = runner.context(h)
    cap = _Capture(o)
    width, k_folds, dev = o.in_features, folds_of(cfg), runner.device
    z_norm = torch.zeros(n_heads, dtype=torch.float64, device=dev)
    gram_f = torch.zeros(k_folds, width, width, dtype=torch.float64, device=dev) if cfg.refit_attention else None
    cross_f = torch.zeros(k_folds, width, o.out_features, dtype=torch.float64, device=dev) if cfg.refit_attention else None
    yy_f = torch.zeros(k_folds, dtype=torch.float64, device=dev)
    try:
        for s in runner.batches(len(h)):
            out = ad.attention(flat, h[s], ctx)
            z = as_rows(cap.value)
            check_finite(z, "the flattened attention's head outputs")
            z_norm += z.view(len(z), n_heads, -1).double().norm(dim=-1).sum(dim=0)
            if cfg.refit_attention:
                y = as_rows(out if attn_target is None else attn_target[s])
                if o.bias is not None:
                    y = y - o.bias.to(y.dtype)
                add_stats(gram_f, cross_f, yy_f, z, y, s.start, h.shape[1], runner.shard)
    finally:
        cap.close()
    n_tok = global_tokens(h, reduce)
    gram_f, cross_f, yy_f = (reduce(gram_f), reduce(cross_f), reduce(yy_f)) if cfg.refit_attention else (None, None, yy_f)
    gram, cross = (total(gram_f), total(cross_f)) if cfg.refit_attention else (None, None)
    if cfg.head_score == "loss":  # whole KV groups (n_rep heads of head_dim columns each) by the refit's loss
        unit = layout.n_rep * layout.head_dim
        groups = prune.select_by_loss(gram, cross, layout.n_kv_heads, _selection_ridge(cfg) * prune.mean_eigenvalue(gram), unit=unit)
    else:
        if cfg.head_score == "leverage":
            scores = prune.head_leverage(gram, cfg.leverage_lambda * prune.mean_eigenvalue(gram), layout.head_dim)
        else:
            scores = prune.head_importance(reduce(z_norm), int(n_tok), o.weight, layout.head_dim)
        groups = prune.select_kv_groups(scores.cpu(), layout.n_rep, layout.n_kv_heads)
    o_weight, ridge = None, None
    if cfg.refit_attention:
        rows = prune.unit_rows(prune.heads_of_groups(groups, layout.n_rep), layout.head_dim).to(runner.device)
        folds = (gram_f[:, rows[:, None], rows], cross_f[:, rows], yy_f) if k_folds > 1 else None  # k-wide, no [K, k, n] step
        o_weight, ridge = _fit(gram[rows][:, rows], cross[rows], float(yy_f.sum()), int(n_tok), cfg, o.weight[:, rows], folds=folds)
    ad.write(flat, prune.keep_heads(ad.read(flat), groups, layout.n_rep, layout.head_dim, o_weight))
    return groups.tolist(), ridge


def _selection_ridge(cfg: CompressConfig) -> float:
    """Relative ridge of the objective a "loss" score drops units under: the fit's own (its floor with GCV)."""
    ridge = cfg.ridge_for()
    return float(ridge) if isinstance(ridge, (int, float)) else cfg.ridge_floor


def _fit(
    gram: torch.Tensor,
    cross: torch.Tensor,
    yy: float,
    n: int,
    cfg: CompressConfig,
    prior: torch.Tensor,
    leverage_lam: float | None = None,
    folds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """Ridge least-squares weight [D, n_kept] and the relative ridge strength used.

    min_W ||Y - Phi W^T||^2 + lam ||W - W0||^2, i.e. W^T = (G + lam I)^-1 (B + lam W0^T), solved as a
    plain ridge fit of the change W - W0 on the residual target Y - Phi W0^T. ``prior`` W0 is the
    flattened block's own weights for the kept units, so a strong ridge falls back to plain pruning
    instead of shrinking the projection to zero (``ridge_prior="zero"``, the paper's form, uses W0 = 0).
    ``fit_ridge="leverage"`` reuses ``leverage_lam`` (the paper's one lambda, from the full Gram C).
    ``folds`` (G_k [K, n, n], B_k [K, n, D], yy_k [K], summing to gram, cross, yy) are what
    ``fit_ridge="cv"`` cross-validates on, each moved to the same residual target Y - Phi W0^T.
    """
    w0t = prior.double().T if cfg.ridge_prior == "flattened" else torch.zeros_like(cross)
    cross_r, yy_r = _residual(gram, cross, torch.tensor(yy, dtype=torch.float64, device=gram.device), w0t)
    yy_r = float(yy_r)
    scale, how = prune.mean_eigenvalue(gram), cfg.ridge_for()
    if how == "cv":
        if folds is None:
            raise ValueError("fit_ridge='cv' needs per-fold statistics (compress keeps them with cv_folds >= 2)")
        g_k, b_k, yy_k = (t.double() for t in folds)
        lam = prune.cv_ridge(g_k, *_residual(g_k, b_k, yy_k, w0t)) * scale
    elif how == "gcv":
        lam = max(prune.gcv_ridge(gram, cross_r, yy_r, n), cfg.ridge_floor * scale)
    elif how == "leverage":
        lam = leverage_lam if leverage_lam is not None else cfg.leverage_lambda * scale
    else:
        lam = float(how) * scale
    return (w0t + prune.ridge_solve(gram, cross_r, lam)).T, lam / scale if scale > 0 else 0.0


def _residual(gram: torch.Tensor, cross: torch.Tensor, yy: torch.Tensor, w0t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of the residual target Y - Phi W0^T: (B - G W0^T, ||Y||^2 - 2 <W0^T, B> + <W0^T, G W0^T>).

    ``gram`` [..., n, n], ``cross`` [..., n, D], ``yy`` [...]: one fit's sums, or a leading dim of folds.
    """
    g_w0 = gram @ w0t
    return cross - g_w0, yy - 2.0 * (w0t * cross).sum(dim=(-2, -1)) + (w0t * g_w0).sum(dim=(-2, -1))


def _mlp_pass(
    runner: BlockRunner,
    flat: nn.Module,
    h: torch.Tensor,
    out_target: torch.Tensor | None,
    diag_only: bool,
    folds: int = 1,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One pass of the calibration batches through ``flat`` (heads already pruned), streaming MLP statistics.

    psi = the channel activations (down_proj's input); Y = out_target - u - b_down (what down_proj should
    add). Returns, per fold of windows (``add_stats``; a leading dim of ``folds``): C = sum psi^T psi, or
    only its diagonal (summed over folds) when ``diag_only``; B = sum psi^T Y, or None without a target or
    when ``diag_only``; ||Y||^2. ``keep`` (channel indices) gathers them for psi[:, keep] only, against
    the target of all channels: without ``out_target`` that is the flattened MLP's own Y = psi W_down^T.
    """
    ad = runner.adapter
    down = ad.down_module(flat)
    width, dev = (down.in_features if keep is None else len(keep)), runner.device
    ctx = runner.context(h)
    gram = (
        torch.zeros(width, dtype=torch.float64, device=dev)
        if diag_only
        else torch.zeros(folds, width, width, dtype=torch.float64, device=dev)
    )
    with_cross = (out_target is not None or keep is not None) and not diag_only
    cross = torch.zeros(folds, width, down.out_features, dtype=torch.float64, device=dev) if with_cross else None
    yy = torch.zeros(folds, dtype=torch.float64, device=dev)
    cap = _Capture(down)
    try:
        for s in runner.batches(len(h)):
            u = h[s] + ad.attention(flat, h[s], ctx)
            ad.mlp(flat, u)  # the hook keeps the channel activations psi (down's input)
            psi = as_rows(cap.value)
            check_finite(psi, "the flattened MLP's channel activations")
            if diag_only:
                gram += psi.double().pow(2).sum(dim=0)
                continue
            y = None
            if with_cross and out_target is None:  # the flattened MLP's own output, less its bias
                y = psi @ down.weight.T.to(psi.dtype)
            elif with_cross:
                y = as_rows(out_target[s] - u)
                if down.bias is not None:
                    y = y - down.bias.to(y.dtype)
            add_stats(gram, cross, yy, psi if keep is None else psi[:, keep], y, s.start, h.shape[1], runner.shard)
    finally:
        cap.close()
    return gram, cross, yy


@torch.no_grad()
def prune_mlp_stage(
    runner: BlockRunner,
    flat: nn.Module,
    h: torch.Tensor,
    out_target: torch.Tensor | None,
    n_keep: int,
    cfg: CompressConfig,
    reduce: Reduce,
) -> tuple[list[int], float]:
    """Nystrom pruning of the 2I MLP channels of ``flat`` (attention already pruned) to ``n_keep``.

    ``out_target`` [N, T, D] is what the whole block should output (None: the flattened MLP itself).
    Returns the kept channels and the relative ridge of the down_proj correction. With
    ``channel_score="energy"`` a first pass keeps only C's diagonal; the block is then pruned to the kept
    channels and a second pass, through I channels instead of 2I, gathers their Gram.
    """
    ad = runner.adapter
    n_tok = int(global_tokens(h, reduce))
    lam, k_folds = None, folds_of(cfg)
    if cfg.channels_by == "energy":
        sq, _, _ = _mlp_pass(runner, flat, h, out_target, diag_only=True)
        channels = prune.top_sorted(prune.channel_energy(reduce(sq), n_tok, ad.down_module(flat).weight).cpu(), n_keep)
        ad.write(flat, prune.keep_channels(ad.read(flat), channels))  # down keeps its columns W0: the ridge's prior
        kept = torch.arange(n_keep)
        g_f, b_f, yy_f = (None if t is None else reduce(t) for t in _mlp_pass(runner, flat, h, out_target, False, k_folds))
        g = total(g_f)
        b, yy = (total(b_f), yy_f.sum()) if b_f is not None else (None, None)
    else:
        gram, full_cross, yy = _mlp_pass(runner, flat, h, out_target, False)  # one fold: the sums
        gram = total(reduce(gram))
        lam = cfg.leverage_lambda * prune.mean_eigenvalue(gram)
        w = ad.down_module(flat).weight.double()
        # Flattened target Y = Psi W_down^T: B = C W_down^T (the paper's closed form), ||Y||^2 = tr(W C W^T).
        if full_cross is None:
            full_cross, yy = gram @ w.T, ((w @ gram) * w).sum()
        else:
            full_cross, yy = total(reduce(full_cross)), total(reduce(yy))
        if cfg.channels_by == "loss":
            channels = prune.select_by_loss(gram, full_cross, n_keep, _selection_ridge(cfg) * prune.mean_eigenvalue(gram))
        else:
            channels = prune.select_channels(gram, n_keep, lam)
        kept = channels
        idx = channels.to(gram.device)
        g, b = gram[idx][:, idx], full_cross[idx]
        del gram, full_cross
        if k_folds > 1:  # per-fold statistics of the kept channels only, in a second pass: K I^2, not K (2I)^2
            g_f, b_f, yy_f = (reduce(t) for t in _mlp_pass(runner, flat, h, out_target, False, k_folds, keep=idx))
    down = ad.down_module(flat)
    folds = (g_f, b_f, yy_f) if k_folds > 1 else None
    down_w, ridge = _fit(g, b, float(yy), n_tok, cfg, down.weight[:, kept.to(down.weight.device)], leverage_lam=lam, folds=folds)
    ad.write(flat, prune.keep_channels(ad.read(flat), kept, down_w))
    return channels.tolist(), ridge


@torch.no_grad()
def fit_block(
    runner: BlockRunner,
    block: nn.Module,
    originals: list[nn.Module],
    h: torch.Tensor,
    layout: HeadLayout,
    cfg: CompressConfig,
    reduce: Reduce = no_reduce,
    dense_out: torch.Tensor | None = None,
    parts: list[nn.Module] | None = None,
) -> tuple[list[int], list[int], dict]:
    """Prune ``block`` to H heads and I channels (all, if it has no more) and fit its corrections on input ``h``.

    ``originals`` are the group's uncompressed blocks (the sequential target); ``dense_out`` [N, T, D]
    is the dense model's hidden state after the group, for error feedback: the output target is
    Y = Y_seq + feedback (Y_dense - Y_seq). ``parts``, the blocks ``block`` was flattened from, are what
    the input fit (``cfg.fits_inputs``) matches; None (a block fitted again after the merges) skips it.
    Returns (kept KV groups, kept channels, relative ridges).
    """
    attn_target = out_target = None
    if cfg.correction == "sequential":
        attn_target, out_target = sequential_targets(runner, originals, h)
        if cfg.feedback and dense_out is not None:
            out_target += cfg.feedback * (dense_out - out_target)
    seen = part_inputs(runner, parts, h) if cfg.fits_inputs and parts is not None else None  # before the block moves in
    ridges = {}
    with on_device(block, runner.device, runner.offload):
        if seen is not None:
            ridges["attention_inputs"] = fit_part_inputs(runner, block, parts, seen.pop("attn"), h, "attn", cfg, reduce)
        groups, ridges["attention"] = prune_attention_stage(runner, block, h, attn_target, layout, cfg, reduce)
        del attn_target
        if seen is not None:
            ridges["mlp_inputs"] = fit_part_inputs(runner, block, parts, seen.pop("mlp"), h, "mlp", cfg, reduce)
        channels, ridges["mlp"] = prune_mlp_stage(runner, block, h, out_target, runner.adapter.intermediate_size(), cfg, reduce)
    return groups, channels, ridges


@torch.no_grad()
def refit_merged(
    runner: BlockRunner,
    blocks: list[nn.Module],
    groups: list[list[int]],
    originals: list[nn.Module],
    cache: InputCache,
    dense: InputCache | None,
    layout: HeadLayout,
    cfg: CompressConfig,
    reduce: Reduce = no_reduce,
) -> list[dict]:
    """One pass front to back: re-fit the corrections of every merged block on the final model's inputs.

    A merge changes the inputs of every later block, so a block fitted early was fitted on inputs the
    final model no longer produces; this fits it again (same heads and channels; not the input fit, whose parts
    are gone). Returns the ridges.
    """
    h, ridges = cache.embeddings, []
    for k, block in enumerate(blocks):
        if len(groups[k]) > 1:
            dense_out = dense.input_of(originals, groups[k][-1] + 1) if dense is not None else None
            ridges.append(fit_block(runner, block, [originals[i] for i in groups[k]], h, layout, cfg, reduce, dense_out)[2])
            del dense_out
        if k < len(blocks) - 1:
            h = runner.run_block(block, h, f"block {k}")
    return ridges


def candidate_pairs(sims: list[float], groups: list[list[int]], max_group: int, n: int, within: list[list[int]] | None = None) -> list[int]:
    """Indices k of up to ``n`` adjacent pairs (k, k+1) that may still merge, most similar inputs first.

    A pair may merge if the new block holds at most ``max_group`` original blocks (0: any) and, where
    ``within`` (a partition of the original blocks) is given, both halves lie in the same part of it.
    """
    part = None if within is None else {i: j for j, g in enumerate(within) for i in g}

    def admissible(k: int) -> bool:
        if max_group and len(groups[k]) + len(groups[k + 1]) > max_group:
            return False
        return part is None or part[groups[k][0]] == part[groups[k + 1][0]]

    allowed = [k for k in range(len(groups) - 1) if admissible(k)]
    if not allowed:
        raise ValueError(f"no adjacent pair can merge under max_group_size={max_group}. Fix: raise it or the target depth.")
    return sorted(allowed, key=lambda k: -sims[k])[:n]  # stable: ties go to the shallower pair


def choose_pair(sims: list[float], groups: list[list[int]], max_group: int) -> int:
    """Index k of the adjacent pair (k, k+1) with the most similar inputs that may still merge."""
    return candidate_pairs(sims, groups, max_group, 1)[0]


@torch.no_grad()
def final_error(runner: BlockRunner, blocks: list[nn.Module], h: torch.Tensor, target: torch.Tensor, reduce: Reduce = no_reduce) -> float:
    """1 - mean token cosine between ``blocks`` run on ``h`` and ``target`` [N, T, D] (the dense last hidden state)."""
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for i, block in enumerate(blocks):
        h = runner.run_block(block, h, f"candidate tail block {i}")
    for s in runner.batches(len(h)):
        total = total + token_cosine_sum(h[s], target[s].to(h.device))
    return 1.0 - float(reduce(total)) / global_tokens(h, reduce)


def holdout_rows(n: int, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, score rows) of a rank's ``n`` windows: every ``every``-th window (the last of each run of
    ``every``) is scored, the rest fitted on; spread through the calibration text rather than one end of it."""
    if n < every:
        raise ValueError(
            f"trial_holdout={every} holds out every {every}-th calibration window, but a rank has only {n}. "
            f"Fix: pass at least {every} windows per rank or set trial_holdout to 0."
        )
    rows = torch.arange(n)
    scored = rows % every == every - 1
    return rows[~scored], rows[scored]


def pair_parallel_error(runner: BlockRunner, cache: InputCache, blocks: list[nn.Module], k: int, reduce: Reduce) -> float:
    """calibrate.parallel_error of the pair (k, k+1) on the first quarter of the windows.

    The pair's input comes from ``cache``; its inner input and output too where they are kept (fast mode with
    ``input_stride`` 1: stale after a merge, like every later input there), else the pair runs on those rows.
    """
    m = error_rows(len(cache.embeddings))
    h0 = cache.input_of(blocks, k, rows=m)
    h1 = cache.kept(k + 1, m)
    h1 = runner.run_block(blocks[k], h0, f"block {k}") if h1 is None else h1
    h2 = cache.kept(k + 2, m)
    h2 = runner.run_block(blocks[k + 1], h1, f"block {k + 1}") if h2 is None else h2
    return parallel_error(runner, blocks[k + 1], h0, h1, h2, reduce)


def merge_runs(groups: list[list[int]], n: int | None = None) -> list[list[int]]:
    """``groups`` sorted, checked to be disjoint runs of adjacent block indices (in 0..n-1 where ``n`` is given)."""
    runs = sorted((list(g) for g in groups if len(g) > 0), key=lambda g: g[0])
    flat = [i for g in runs for i in g]
    bad_run = any(g != list(range(g[0], g[0] + len(g))) for g in runs)
    out_of_range = bool(flat) and (min(flat) < 0 or (n is not None and max(flat) >= n))
    if bad_run or len(set(flat)) != len(flat) or out_of_range:
        where = "" if n is None else f" in 0..{n - 1}"
        raise ValueError(
            f"groups must be disjoint runs of adjacent block indices{where}, got {groups}. Fix: e.g. [[12, 13, 14], [20, 21]]."
        )
    return runs


def partition(groups: list[list[int]], n: int, target: int) -> list[list[int]]:
    """The partition of blocks 0..n-1 that ``groups`` (runs of adjacent indices; singletons may be left
    out) asks for, checked to give ``target`` blocks."""
    runs = merge_runs(groups, n)
    covered = {i for g in runs for i in g}
    out = sorted(runs + [[i] for i in range(n) if i not in covered], key=lambda g: g[0])
    if len(out) != target:
        merged = [g for g in runs if len(g) > 1]
        raise ValueError(
            f"groups {merged} leave {len(out)} of {n} blocks, not the target {target}. Fix: runs whose lengths less one add up to {n - target}."
        )
    return out


def validate_target(current: int, target: int) -> None:
    if not 1 <= target < current:
        raise ValueError(
            f"target depth {target} is impossible for a model of {current} layers: it must be at least 1 "
            f"and less than {current}. Fix: pass --target-layers between 1 and {current - 1} (or a ratio in (0, 1))."
        )


@torch.no_grad()
def flatten_gpt(
    model: PreTrainedModel,
    calib_ids: torch.Tensor,
    cfg: CompressConfig,
    device: torch.device | str | None = None,
    reduce: Reduce = no_reduce,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> Plan:
    """Compress ``model`` in place to ``cfg.target_layers`` blocks; returns the plan.

    ``calib_ids`` [N, T]: this rank's calibration windows. Under DDP every rank passes its shard (windows
    rank, rank + world, ... of the whole set: ``shard`` = (rank, world)) and an all-reduce(SUM) as
    ``reduce``; the decisions then agree on every rank, and with one process on all windows.
    """
    adapter = get_adapter(model)
    blocks = list(adapter.blocks())
    validate_target(len(blocks), cfg.target_layers)
    wanted = None if cfg.groups is None else partition(cfg.groups, len(blocks), cfg.target_layers)
    window = adapter.max_window()
    if window is not None and calib_ids.shape[1] > window:
        raise ValueError(
            f"calibration windows of {calib_ids.shape[1]} tokens exceed the sliding window {window}. Fix: use --calib-seqlen <= {window}."
        )
    device = torch.device(device or next(model.parameters()).device)
    windows = int(global_count(len(calib_ids), reduce, device))  # all ranks', so every rank takes one ridge rule
    if cfg.fit_ridge == "cv" and windows < cfg.cv_folds:
        raise ValueError(
            f"fit_ridge='cv' holds out one of {cfg.cv_folds} folds of calibration windows, but there are {windows}. "
            f"Fix: more calibration windows, cv_folds <= {windows}, or a fixed fit_ridge such as 0.1."
        )
    cfg = replace(cfg, fit_ridge=cfg.ridge_for(windows))  # the report records the ridge rule in use
    layout = adapter.layout()
    runner = BlockRunner(model, device, cfg.batch_size, cfg.offload, shard)
    plan = Plan(len(blocks), config=asdict(cfg))
    originals = list(blocks)  # never modified: flattening builds new modules
    groups = [[i] for i in range(len(blocks))]
    stride = InputCache.auto_stride(len(blocks)) if cfg.input_stride is None else cfg.input_stride
    cache = InputCache(runner, runner.embed(calib_ids), stride)
    sims = io_similarities(runner, cache.embeddings, blocks, reduce=reduce, cache=cache)
    plan.initial_similarities = list(sims)
    # The dense model's block inputs (originals never change), for feedback targets and candidate trials.
    trials = cfg.candidates > 1 and not cfg.fast and wanted is None  # fit every candidate and run it to the end
    dense = cache.snapshot() if cfg.feedback or trials else None
    dense_final = dense.input_of(originals, len(originals)) if trials else None
    held = holdout_rows(len(calib_ids), cfg.trial_holdout) if trials and cfg.trial_holdout else None
    final_target = dense_final if held is None or dense_final is None else dense_final[held[1]]
    bar = tqdm(total=len(blocks) - cfg.target_layers, desc="flatten+prune", disable=not progress)
    while len(blocks) > cfg.target_layers:
        t0 = time.perf_counter()
        best, tried = None, []
        pairs = candidate_pairs(sims[:-1], groups, cfg.max_group_size, 1 if wanted else cfg.candidates, wanted)
        if cfg.fast and len(pairs) > 1:  # compare by parallel error, fit the chosen pair only
            tried = [[j, pair_parallel_error(runner, cache, blocks, j, reduce)] for j in pairs]
            pairs = [min(tried, key=lambda t: t[1])[0]]
        for k in pairs:
            h = cache.input_of(blocks, k)
            members = groups[k] + groups[k + 1]
            dense_out = dense.input_of(originals, members[-1] + 1) if cfg.feedback else None
            new = flatten_blocks(adapter, blocks[k : k + 2])
            fit_on, scored = (h, h) if held is None else (h[held[0]], h[held[1]])
            sub = dense_out if held is None or dense_out is None else dense_out[held[0]]
            fit = fit_block(runner, new, [originals[i] for i in members], fit_on, layout, cfg, reduce, sub, blocks[k : k + 2])
            del fit_on, sub
            err = final_error(runner, [new, *blocks[k + 2 :]], scored, final_target, reduce) if trials else 0.0
            if trials:
                tried.append([k, err])
            if best is None or err < best[0]:
                best = (err, k, h, members, new, fit, dense_out)
            del dense_out
        _, k, h, members, new, (kv, ch, ridge), dense_out = best
        if held is not None:  # the chosen pair, fitted again on every window
            new = flatten_blocks(adapter, blocks[k : k + 2])
            kv, ch, ridge = fit_block(runner, new, [originals[i] for i in members], h, layout, cfg, reduce, dense_out, blocks[k : k + 2])
        del dense_out
        chosen = sims[k]
        blocks[k : k + 2] = [new]
        groups[k : k + 2] = [members]
        if cfg.fast:  # later blocks keep their inputs and similarities; the merged block's replaces the pair's
            cache.merged(k)
            sims[k : k + 2] = io_similarities(runner, h, [new], start=k, reduce=reduce, cache=cache)
        else:
            cache.truncate(k)
            sims[k:] = io_similarities(runner, h, blocks[k:], start=k, reduce=reduce, cache=cache)
        step = Step(k, members, chosen, kv, ch, ridge, time.perf_counter() - t0, tried)
        plan.steps.append(step)
        log.info("step %d: merged original blocks %s (similarity %.4f) in %.1fs", len(plan.steps), members, chosen, step.seconds)
        bar.update(1)
        bar.set_postfix(blocks=len(blocks))
    bar.close()
    for p in range(cfg.refit_passes):
        ridges = refit_merged(runner, blocks, groups, originals, cache, dense, layout, cfg, reduce)
        log.info("refit pass %d: relative ridges %s", p + 1, ridges)
    adapter.install(blocks, groups)
    return plan


@torch.no_grad()
def rebuild_structure(model: PreTrainedModel, plan: Plan) -> None:
    """Replay ``plan`` on a dense model's structure (shapes and layer wiring, not fitted weights).

    Used to load a checkpoint of a compressed model into a freshly loaded dense one: the weights
    are then overwritten by the checkpoint's state dict.
    """
    adapter = get_adapter(model)
    blocks = list(adapter.blocks())
    if len(blocks) != plan.original_layers:
        raise ValueError(
            f"the plan was made for a model of {plan.original_layers} layers but this model has {len(blocks)}. "
            "Fix: load the same base model the checkpoint was compressed from."
        )
    layout = adapter.layout()
    for step in plan.steps:
        if not 0 <= step.position < len(blocks) - 1:
            raise ValueError(f"plan step at position {step.position} does not fit a model of {len(blocks)} blocks")
        flat = flatten_blocks(adapter, blocks[step.position : step.position + 2])
        w = prune.keep_heads(adapter.read(flat), torch.tensor(step.kept_kv_groups), layout.n_rep, layout.head_dim)
        adapter.write(flat, prune.keep_channels(w, torch.tensor(step.kept_channels)))
        blocks[step.position : step.position + 2] = [flat]
    adapter.install(blocks, plan.groups)
