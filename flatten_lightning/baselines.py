"""Peer methods run in the same pipeline, for side-by-side numbers (docs/DESIGN.md section 1.5).

Every method compresses a model in place and ends in the adapter's ``install``, so config.num_hidden_layers,
layer_types and every layer_idx stay consistent. Notation as in docs/DESIGN.md: L blocks, block l maps
h -> u = h + Attn_l(N_l(h)) -> out = u + MLP_l(N'_l(u)).

- ShortGPT (Men et al., 2024): block influence BI_l = 1 - E[cos(input_l, output_l)] on calibration
  data, measured once on the dense model; the blocks with the lowest BI are removed.
- SLEB (Song et al., 2024): greedy; at each step remove the block whose removal gives the lowest
  calibration perplexity, re-scored on the model left by the previous removals. Any other score of
  the last block's output can replace perplexity (a vision backbone: feature disagreement with the
  dense model, ``vision.agreement.FeatureDisagreement``).
- LaCo (Yang et al., 2024): layer collapse. Reserving-Differences-while-Seeking-Common merge of
  blocks l..l+m into one: theta* = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l), for the
  attention and MLP parameters. Candidates are tried from the top down and kept when the cosine similarity between the
  dense and the merged model's final representations on calibration data exceeds a threshold T.
- BlockPruner (Zhong et al., 2024): greedy removal of single attention or MLP sub-blocks, each step
  the one whose removal gives the lowest calibration perplexity, until the parameters removed equal
  those of the blocks the other methods drop.
- flatten-noprune: the flattened blocks of FlattenGPT kept at full width (nH heads, nI channels):
  the flattening error alone, before any pruning.

Calibration perplexity (SLEB, BlockPruner) is exp(mean NLL) of the calibration windows' next tokens.
Candidates are scored in order of depth with the hidden state entering the candidate carried
forward, so the prefix below a candidate is never re-run: one step costs about L^2/2 block runs plus
L head evaluations. On a CPU that is slow, so ``score_ids`` lets a caller score on fewer tokens.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from flatten_lightning.adapters import ModelAdapter, Sub, get_adapter
from flatten_lightning.calibrate import BlockRunner, InputCache, Reduce, io_similarities, no_reduce
from flatten_lightning.compress import choose_pair, partition, validate_target
from flatten_lightning.flatten import flatten_blocks

log = logging.getLogger(__name__)


def _runner(model: PreTrainedModel, device: torch.device | str | None, batch_size: int) -> BlockRunner:
    return BlockRunner(model, device or next(model.parameters()).device, batch_size)


# ----------------------------------------------------------------------------------------- ShortGPT
@torch.no_grad()
def shortgpt(
    model: PreTrainedModel,
    calib_ids: torch.Tensor,
    target_layers: int,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    reduce: Reduce = no_reduce,
) -> tuple[list[int], list[float]]:
    """Drop the blocks of lowest block influence in place; returns (removed indices, BI per block)."""
    adapter = get_adapter(model)
    blocks = list(adapter.blocks())
    validate_target(len(blocks), target_layers)
    runner = _runner(model, device, batch_size)
    influence = [1.0 - s for s in io_similarities(runner, runner.embed(calib_ids), blocks, reduce=reduce)]
    removed = sorted(sorted(range(len(blocks)), key=lambda i: influence[i])[: len(blocks) - target_layers])
    kept = [i for i in range(len(blocks)) if i not in removed]
    adapter.install([blocks[i] for i in kept], [[i] for i in kept])
    return removed, influence


# --------------------------------------------------------------------------- calibration perplexity
class CalibrationNLL:
    """Mean next-token NLL of calibration windows ``ids`` [N, T] from the last block's output [N, T, D].

    Logits are formed one window at a time ([T, V] in memory, not [N, T, V]) and scored in float32.
    """

    def __init__(self, model: PreTrainedModel, runner: BlockRunner, ids: torch.Tensor):
        self.norm = runner.adapter.final_norm()
        self.head = runner.adapter.lm_head()
        self.targets = ids[:, 1:].to(runner.device)
        self.count = self.targets.numel()

    @torch.no_grad()
    def __call__(self, out: torch.Tensor) -> float:
        total = 0.0
        for i in range(len(out)):
            logits = self.head(self.norm(out[i, :-1]))
            if logits.dtype in (torch.float16, torch.bfloat16):  # a low-precision softmax over V would blur the ranking
                logits = logits.float()
            total += torch.nn.functional.cross_entropy(logits, self.targets[i], reduction="sum").item()
        return total / self.count


def run_sub_blocks(runner: BlockRunner, block: nn.Module, h: torch.Tensor, attn: bool = True, mlp: bool = True) -> torch.Tensor:
    """One block [N, T, D] -> [N, T, D] with its attention and/or MLP sub-block left out.

    A left-out sub-block adds nothing to the residual stream, exactly as if its output projection
    were zero: u = h (+ Attn(N(h))), out = u (+ MLP(N'(u))).
    """
    if attn and mlp:
        return runner.run_block(block, h)
    if not attn and not mlp:
        return h
    ad = runner.adapter

    def kept(s: slice, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x + ad.attention(block, x, ctx) if attn else x + ad.mlp(block, x)

    return runner.map_batches(block, h, kept, "a sub-block")


# --------------------------------------------------------------------------------------------- SLEB
@torch.no_grad()
def sleb(
    model: PreTrainedModel,
    calib_ids: torch.Tensor,
    target_layers: int,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    score_ids: torch.Tensor | None = None,
    score: Callable[[torch.Tensor], float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """SLEB: remove, one at a time, the block whose removal gives the lowest score (default: calibration perplexity).

    ``score_ids`` [n, ...] are the inputs scored (default ``calib_ids``). ``score`` maps the last block's
    output on them [n, T, D] to a number to minimise; None: perplexity exp(NLL) of the windows' next
    tokens (needs a language-model head). Returns ``{"removed": original indices in removal order,
    "scored_by", "steps": [{"removed", key: best, "scores": {original index: value}}]}`` with key
    ``"ppl"`` for perplexity and ``"score"`` for a given ``score``.
    """
    adapter = get_adapter(model)
    blocks = list(adapter.blocks())
    validate_target(len(blocks), target_layers)
    ids = calib_ids if score_ids is None else score_ids
    runner = _runner(model, device, batch_size)
    key = "ppl" if score is None else "score"
    if score is None:
        nll = CalibrationNLL(model, runner, ids)
        measure: Callable[[torch.Tensor], float] = lambda out: math.exp(nll(out))  # noqa: E731
    else:
        measure = score
    emb = runner.embed(ids)
    alive = list(range(len(blocks)))
    steps: list[dict[str, Any]] = []
    bar = tqdm(total=len(blocks) - target_layers, desc="SLEB", disable=not progress)
    while len(alive) > target_layers:
        scores: dict[int, float] = {}
        h = emb  # input of the candidate block: carried forward, never recomputed
        for pos, j in enumerate(alive):
            rest = [blocks[i] for i in alive[pos + 1 :]]
            scores[j] = measure(runner.run_blocks(rest, h))
            if pos + 1 < len(alive):
                h = runner.run_block(blocks[j], h, f"block {j}")
        best = min(alive, key=lambda j: (scores[j], j))
        alive.remove(best)
        steps.append({"removed": best, key: scores[best], "scores": scores})
        log.info("SLEB: removed block %d (%s %.4f)", best, key, scores[best])
        bar.update(1)
    bar.close()
    adapter.install([blocks[i] for i in alive], [[i] for i in alive])
    scored_by = "calibration perplexity" if score is None else type(score).__name__
    return {"removed": [s["removed"] for s in steps], "scored_by": scored_by, "steps": steps}


# --------------------------------------------------------------------------------------------- LaCo
@torch.no_grad()
def rdsc_merge(adapter: ModelAdapter, blocks: Sequence[nn.Module]) -> nn.Module:
    """LaCo's merge of ``blocks`` into a copy of the first: theta* = theta_0 + sum_{k>=1} (theta_k - theta_0).

    Applied, as in the paper, to the attention (SAN) and MLP parameters (projection weights and
    biases), computed in float64; the norm weights stay the base block's. The inputs are not modified.
    """
    if len(blocks) < 2:
        raise ValueError(f"merging needs at least two blocks, got {len(blocks)}")
    out = copy.deepcopy(blocks[0])

    def branch_params(block: nn.Module) -> list[nn.Parameter]:  # attention and MLP, not their norms (sub_modules' last)
        return [p for sub in ("attn", "mlp") for m in adapter.sub_modules(block, sub)[:-1] for p in m.parameters()]

    params = [branch_params(b) for b in blocks]
    for i, p in enumerate(branch_params(out)):
        base = params[0][i].double()
        merged = base + sum(ps[i].double() - base for ps in params[1:])
        p.copy_(merged.to(p.dtype))
    return out


def _mean_token_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@torch.no_grad()
def laco(
    model: PreTrainedModel,
    calib_ids: torch.Tensor,
    target_layers: int,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    merge_layers: int = 4,
    threshold: float = 0.65,
    interval: int = 2,
    low: int = 1,
    high: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """LaCo layer collapse (Yang et al., 2024, Algorithm 1) to exactly ``target_layers`` blocks.

    Paper's loop: l starts at ``high - C`` (C = ``merge_layers``); blocks l..l+C-1 are RDSC-merged into
    one; the merge is kept when s = mean over calibration tokens of cos(R(dense), R(merged)) exceeds
    ``threshold`` (R: the final-norm output, what the LM head sees), then l -= ``interval``, else
    l -= 1; l is clamped to the current depth - C; the loop ends below ``low``. Ours, where the paper
    is silent: the last merge takes only as many blocks as are still to remove, so the depth is hit
    exactly; and if the sweep ends short of it, merges are added greedily by the highest s over every
    position >= ``low`` (recorded as "fallback"). Returns ``{"merges": [...], "candidates": [...]}``.

    Memory: the dense model's input to every block is held on the CPU ([L, N, T, D]) for the sweep.
    """
    adapter = get_adapter(model)
    blocks = list(adapter.blocks())
    n = len(blocks)
    validate_target(n, target_layers)
    if merge_layers < 2 or interval < 1:
        raise ValueError(f"LaCo needs merge_layers >= 2 and interval >= 1, got {merge_layers}, {interval}")
    high = n if high is None else min(high, n)
    runner = _runner(model, device, batch_size)
    norm = adapter.final_norm()
    inputs = [runner.embed(calib_ids)]
    for i, block in enumerate(blocks):  # dense inputs; the sweep only merges above l, so they stay valid below it
        inputs.append(runner.run_block(block, inputs[-1].to(runner.device), f"block {i}").cpu())
    inputs[0] = inputs[0].cpu()
    reference = norm(inputs.pop().to(runner.device))
    groups = [[i] for i in range(n)]
    merges: list[dict[str, Any]] = []
    candidates: list[dict[str, Any]] = []

    def similarity(pos: int, c: int, h: torch.Tensor) -> tuple[float, nn.Module]:
        merged = rdsc_merge(adapter, blocks[pos : pos + c])
        out = runner.run_blocks([merged] + blocks[pos + c :], h)
        s = _mean_token_cos(norm(out), reference)
        candidates.append({"position": pos, "members": sum(groups[pos : pos + c], []), "similarity": s})
        return s, merged

    def accept(pos: int, c: int, merged: nn.Module, s: float, how: str) -> None:
        members = sum(groups[pos : pos + c], [])
        blocks[pos : pos + c] = [merged]
        groups[pos : pos + c] = [members]
        merges.append({"position": pos, "members": members, "similarity": s, "accepted_by": how})
        log.info("LaCo: merged original blocks %s (similarity %.4f, %s)", members, s, how)

    bar = tqdm(total=n - target_layers, desc="LaCo", disable=not progress)
    l = high - merge_layers
    while l >= low and len(blocks) > target_layers:
        c = min(merge_layers, len(blocks) - target_layers + 1)
        s, merged = similarity(l, c, inputs[l].to(runner.device))
        if s > threshold:
            accept(l, c, merged, s, "threshold")
            bar.update(c - 1)
            l -= interval
        else:
            l -= 1
        l = min(l, len(blocks) - merge_layers)
    del inputs
    while len(blocks) > target_layers:  # fallback: best merge anywhere at or above `low`
        c = min(merge_layers, len(blocks) - target_layers + 1)
        first = min(low, len(blocks) - c)
        h = runner.run_blocks(blocks[:first], runner.embed(calib_ids))
        best: tuple[float, int, nn.Module] | None = None
        for pos in range(first, len(blocks) - c + 1):
            s, merged = similarity(pos, c, h)
            if best is None or s > best[0]:
                best = (s, pos, merged)
            h = runner.run_block(blocks[pos], h, f"block {pos}")
        s, pos, merged = best
        accept(pos, c, merged, s, "fallback")
        bar.update(c - 1)
    bar.close()
    adapter.install(blocks, groups)
    return {"merges": merges, "candidates": candidates, "groups": groups}


# -------------------------------------------------------------------------------------- BlockPruner
def sub_block_params(adapter: ModelAdapter, block: nn.Module, sub: Sub) -> int:
    """Parameters of a sub-block: attention with its input norm, or the MLP with its norm."""
    return sum(p.numel() for m in adapter.sub_modules(block, sub) for p in m.parameters())


@torch.no_grad()
def zero_sub_block(adapter: ModelAdapter, block: nn.Module, sub: Sub) -> None:
    """Make a sub-block add exactly nothing: zero its output projection (o_proj / down_proj) and bias."""
    proj = adapter.o_module(block) if sub == "attn" else adapter.down_module(block)
    proj.weight.zero_()
    if proj.bias is not None:
        proj.bias.zero_()


def pack_sub_blocks(
    adapter: ModelAdapter, blocks: Sequence[nn.Module], removed: set[tuple[int, Sub]]
) -> tuple[list[nn.Module], list[list[int]], list[dict[str, Any]]]:
    """Stock decoder layers that compute the sub-blocks left after ``removed``, in order.

    The kept sub-blocks form a sequence A_i, M_i, A_j, ... Every attention followed directly by an
    MLP becomes one stock layer (from different blocks when the sub-blocks between were removed:
    attention and input norm of the first, MLP and post-attention norm of the second). A lone
    sub-block becomes a layer whose other sub-block is zeroed: a plain config cannot describe a
    layer without one, so it is stored and still costs its parameters. Every attention-MLP adjacency
    is taken (they cannot overlap), so no packing has fewer zeroed sub-blocks.
    Returns (layers, groups of original indices, zeroed [{"layer", "block", "sub"}]).
    """
    seq = [(i, s) for i in range(len(blocks)) for s in ("attn", "mlp") if (i, s) not in removed]
    layers: list[nn.Module] = []
    groups: list[list[int]] = []
    zeroed: list[dict[str, Any]] = []
    k = 0
    while k < len(seq):
        i, s = seq[k]
        if s == "attn" and k + 1 < len(seq) and seq[k + 1][1] == "mlp":
            j = seq[k + 1][0]
            layer = blocks[i] if i == j else copy.deepcopy(blocks[i])
            if i != j:
                adapter.transplant_mlp(layer, blocks[j])
            layers.append(layer)
            groups.append([i] if i == j else [i, j])
            k += 2
            continue
        layer = copy.deepcopy(blocks[i])
        other: Sub = "mlp" if s == "attn" else "attn"
        zero_sub_block(adapter, layer, other)
        zeroed.append({"layer": len(layers), "block": i, "sub": other})
        layers.append(layer)
        groups.append([i])
        k += 1
    return layers, groups, zeroed


@torch.no_grad()
def blockpruner(
    model: PreTrainedModel,
    calib_ids: torch.Tensor,
    target_layers: int,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    score_ids: torch.Tensor | None = None,
    budget: Literal["params", "sub_blocks"] = "params",
    progress: bool = True,
) -> dict[str, Any]:
    """BlockPruner: remove attention or MLP sub-blocks one at a time by calibration perplexity.

    The amount removed matches dropping ``L - target_layers`` whole blocks: by parameters (default,
    as the paper compares methods at equal parameter ratios; attention and MLP differ in size, so
    it stops at the first step that reaches the budget) or by count (``"sub_blocks"``: exactly
    2 (L - target_layers)). The result is packed into stock layers (``pack_sub_blocks``): its depth
    is at least ``target_layers``, and lone sub-blocks are kept with a zeroed partner, counted in
    the parameters. Returns ``{"removed": [[block, sub], ...], "zeroed", "params_removed", ...}``.
    """
    adapter = get_adapter(model)
    blocks = list(adapter.blocks())
    n = len(blocks)
    validate_target(n, target_layers)
    ids = calib_ids if score_ids is None else score_ids
    runner = _runner(model, device, batch_size)
    nll = CalibrationNLL(model, runner, ids)
    emb = runner.embed(ids)
    size = {(i, s): sub_block_params(adapter, blocks[i], s) for i in range(n) for s in ("attn", "mlp")}
    need_params = sum(size[i, s] for i in range(n) for s in ("attn", "mlp")) * (n - target_layers) / n
    need_count = 2 * (n - target_layers)
    removed: set[tuple[int, Sub]] = set()
    steps: list[dict[str, Any]] = []

    def done() -> bool:
        if budget == "sub_blocks":
            return len(removed) >= need_count
        return sum(size[r] for r in removed) >= need_params

    def keeps(i: int) -> tuple[bool, bool]:
        return (i, "attn") not in removed, (i, "mlp") not in removed

    bar = tqdm(desc="BlockPruner", disable=not progress)
    while not done():
        scores: dict[tuple[int, Sub], float] = {}
        h = emb
        for i in range(n):
            a, m = keeps(i)
            for sub, flags in (("attn", (False, m)), ("mlp", (a, False))):
                if (i, sub) in removed:
                    continue
                out = run_sub_blocks(runner, blocks[i], h, *flags)
                for j in range(i + 1, n):
                    out = run_sub_blocks(runner, blocks[j], out, *keeps(j))
                scores[i, sub] = math.exp(nll(out))
            if i + 1 < n:
                h = run_sub_blocks(runner, blocks[i], h, a, m)
        best = min(scores, key=lambda k: (scores[k], k))
        removed.add(best)
        steps.append({"removed": list(best), "ppl": scores[best], "params": size[best]})
        log.info("BlockPruner: removed %s of block %d (calibration ppl %.3f)", best[1], best[0], scores[best])
        bar.update(1)
    bar.close()
    layers, groups, zeroed = pack_sub_blocks(adapter, blocks, removed)
    adapter.install(layers, groups)
    return {
        "removed": [s["removed"] for s in steps],
        "steps": steps,
        "zeroed": zeroed,
        "groups": groups,
        "params_removed": sum(size[r] for r in removed),
        "params_budget": need_params if budget == "params" else None,
        "params_zeroed": sum(sub_block_params(adapter, layers[z["layer"]], z["sub"]) for z in zeroed),
    }


# ---------------------------------------------------------------------------------- flatten-noprune
@torch.no_grad()
def flatten_noprune(
    model: PreTrainedModel,
    calib_ids: torch.Tensor,
    target_layers: int,
    device: torch.device | str | None = None,
    batch_size: int = 4,
    groups: list[list[int]] | None = None,
    max_group_size: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Flatten groups of adjacent blocks exactly (``flatten.flatten_blocks``) and prune nothing.

    A group of n blocks becomes one block of nH heads and nI channels computing them in parallel,
    so the only change from the dense model is the flattening error (docs/DESIGN.md 1.2). ``groups``
    (e.g. a FlattenGPT plan's ``groups``) fixes which blocks merge, isolating the cost of pruning;
    without it pairs are chosen as FlattenGPT chooses them (most similar inputs, re-scored on the
    flattened model after each merge). Wider blocks have no plain HF config: evaluate in memory.
    """
    adapter = get_adapter(model)
    blocks = list(adapter.blocks())
    n = len(blocks)
    validate_target(n, target_layers)
    if groups is not None:
        groups = partition(groups, n, target_layers)
        new = [blocks[g[0]] if len(g) == 1 else flatten_blocks(adapter, [blocks[i] for i in g]) for g in groups]
        adapter.install(new, groups)
        return {"groups": groups, "chosen_by": "given"}
    runner = _runner(model, device, batch_size)
    originals = list(blocks)
    groups = [[i] for i in range(n)]
    cache = InputCache(runner, runner.embed(calib_ids), InputCache.auto_stride(n))
    sims = io_similarities(runner, cache.embeddings, blocks, cache=cache)
    steps: list[dict[str, Any]] = []
    bar = tqdm(total=n - target_layers, desc="flatten-noprune", disable=not progress)
    while len(blocks) > target_layers:
        k = choose_pair(sims[:-1], groups, max_group_size)
        h = cache.input_of(blocks, k)
        members = groups[k] + groups[k + 1]
        steps.append({"position": k, "members": members, "similarity": sims[k]})
        # Flatten the original blocks of the group at once: the same block as flattening pairwise.
        blocks[k : k + 2] = [flatten_blocks(adapter, [originals[i] for i in members])]
        groups[k : k + 2] = [members]
        cache.truncate(k)
        sims[k:] = io_similarities(runner, h, blocks[k:], start=k, cache=cache)
        bar.update(1)
    bar.close()
    adapter.install(blocks, groups)
    return {"groups": groups, "chosen_by": "similarity", "steps": steps}
