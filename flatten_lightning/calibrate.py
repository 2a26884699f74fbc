"""Calibration: run decoder blocks one at a time on held hidden states and stream float64 statistics.

Only the hidden states entering the current block (and, while a group is compressed, its targets)
are held, plus the inputs of every ``stride``-th block on the CPU (``InputCache``: about sqrt(depth)
of them, so that a merge deep in the model does not re-run the whole prefix), never every layer's
activations. Blocks may live on the CPU and visit the compute device one at a time (``offload``), so
a 7B model's calibration fits next to its activations on one GPU. Statistics are sums (not means) so that data-parallel ranks can
all-reduce them and take the same decisions (``reduce``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from flatten_lightning.adapters import get_adapter

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    """Single-process reduction: the identity. Under DDP pass an all-reduce(SUM) instead."""
    return t


class NonFiniteActivationError(FloatingPointError):
    """Calibration activations contain NaN or inf."""


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteActivationError(
            f"calibration activations contain NaN/inf at {where}. Fix: run the model in float32 or "
            "bfloat16 rather than float16 (overflow), and check the weights and the calibration text."
        )


@contextmanager
def on_device(module: nn.Module, device: torch.device, offload: bool) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the block's work and back to the CPU after, if offloading."""
    if not offload:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")


class BlockRunner:
    """Runs the embeddings and decoder blocks of ``model`` in batches on calibration tensors.

    Hidden states are ``[N, T, D]`` tensors on ``device`` in the model's dtype; the model's adapter
    says how to embed the inputs and what a standalone block needs besides h (``context``). ``shard``
    (rank, world): this rank's window i is window rank + world i of the whole calibration set.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device | str,
        batch_size: int = 4,
        offload: bool = False,
        shard: tuple[int, int] = (0, 1),
    ):
        self.model = model
        self.adapter = get_adapter(model)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.offload = offload
        self.shard = shard

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, T] -> block-0 input [N, T, D] on the compute device."""
        with on_device(self.adapter.embed_module(), self.device, self.offload):
            h = torch.cat([self.adapter.embed(b.to(self.device)) for b in ids.split(self.batch_size)])
        check_finite(h, "the embeddings")
        return h

    def context(self, h: torch.Tensor) -> dict:
        """What a standalone block needs besides hidden states like ``h`` (adapter.context), on the device."""
        return self.adapter.context(h[:1].to(self.device))

    def batches(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    @torch.no_grad()
    def map_batches(
        self, block: nn.Module, h: torch.Tensor, fn: Callable[[slice, torch.Tensor, dict], torch.Tensor], where: str
    ) -> torch.Tensor:
        """out[s] = fn(s, h[s], context) for every batch s of ``h`` [N, T, D], with ``block`` on the device.

        The output is written batch by batch into one preallocated tensor (no list + cat, which would
        hold it twice).
        """
        ctx = self.context(h)
        out = torch.empty_like(h)
        with on_device(block, self.device, self.offload):
            for s in self.batches(len(h)):
                out[s] = fn(s, h[s], ctx)
        check_finite(out, f"the output of {where}")
        return out

    def run_block(
        self,
        block: nn.Module,
        h: torch.Tensor,
        where: str = "a block",
        on_batch: Callable[[slice, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """One decoder block on every calibration sequence: [N, T, D] -> [N, T, D].

        ``on_batch(slice, output)`` sees each batch's output, for streaming statistics.
        """

        def fn(s: slice, x: torch.Tensor, ctx: dict) -> torch.Tensor:
            y = self.adapter.run_block(block, x, ctx)
            if on_batch is not None:
                on_batch(s, y)
            return y

        return self.map_batches(block, h, fn, where)

    @torch.no_grad()
    def run_blocks(self, blocks: Sequence[nn.Module], h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Blocks in sequence (``start`` numbers them in messages)."""
        for i, block in enumerate(blocks):
            h = self.run_block(block, h, f"block {start + i}")
        return h


class InputCache:
    """Inputs h_j of every ``stride``-th position of the current block list, kept on the CPU.

    The input of block k then costs at most ``stride - 1`` block runs (from the nearest kept position
    at or before k) instead of k from the embeddings. Positions follow the *current* blocks: a merge
    at position k changes every block input after k, so ``truncate(k)`` drops those until the next
    pass offers them again. ``stride`` 0 keeps only the embeddings (position 0); cached inputs are
    the tensors the runner computed, so results are identical with any stride.
    """

    def __init__(self, runner: BlockRunner, emb: torch.Tensor, stride: int) -> None:
        if stride < 0:
            raise ValueError(f"input stride must be >= 0 (0 = keep no block inputs), got {stride}")
        self.runner, self.stride = runner, stride
        self.saved: dict[int, torch.Tensor] = {0: emb}

    @property
    def embeddings(self) -> torch.Tensor:
        """h_0 [N, T, D], the input of the first block (always kept, on the compute device)."""
        return self.saved[0]

    @staticmethod
    def auto_stride(depth: int) -> int:
        """ceil(sqrt(depth)): about sqrt(depth) kept inputs and at most that many prefix re-runs."""
        return math.isqrt(max(depth - 1, 0)) + 1

    def offer(self, position: int, h: torch.Tensor) -> None:
        """A pass saw ``h`` [N, T, D] entering the block at ``position``: keep it if on the stride."""
        if self.stride and position % self.stride == 0 and position not in self.saved:
            self.saved[position] = h.to("cpu")

    def snapshot(self) -> InputCache:
        """A cache of the same kept inputs (shared tensors) that this one's later truncations leave alone."""
        other = InputCache(self.runner, self.embeddings, self.stride)
        other.saved = dict(self.saved)
        return other

    def truncate(self, position: int) -> None:
        """Forget the inputs after ``position`` (a merge there changed them)."""
        self.saved = {p: h for p, h in self.saved.items() if p <= position}

    def merged(self, position: int) -> None:
        """Blocks ``position`` and ``position + 1`` became one: keep the inputs up to it and the stale inputs
        of the blocks after the pair (renumbered), which a merge changed only slightly (fast mode's bet).

        The input after the merged block (position + 1) is dropped: the next pass offers it fresh.
        """
        self.saved = {p: h for p, h in self.saved.items() if p <= position} | {p - 1: h for p, h in self.saved.items() if p >= position + 3}

    def kept(self, position: int, rows: int) -> torch.Tensor | None:
        """The first ``rows`` windows of the kept input at ``position`` on the device, or None if it is not kept."""
        h = self.saved.get(position)
        return None if h is None else h[:rows].to(self.runner.device)

    def input_of(self, blocks: Sequence[nn.Module], k: int, rows: int | None = None) -> torch.Tensor:
        """h_k: the input of ``blocks[k]``, run from the nearest kept input at or before k (keeping those it passes).

        ``rows``: only the first ``rows`` windows are run (and none is kept: the cache holds whole inputs).
        """
        j = max(p for p in self.saved if p <= k)
        h = self.saved[j][:rows].to(self.runner.device)
        for p in range(j, k):
            h = self.runner.run_block(blocks[p], h, f"block {p}")
            if rows is None:
                self.offer(p + 1, h)
        return h


def global_count(n: int, reduce: Reduce, device: torch.device) -> float:
    """This rank's count ``n`` summed over all ranks (the all-reduce needs a tensor on the compute device)."""
    return float(reduce(torch.tensor(float(n), dtype=torch.float64, device=device)))


def global_tokens(h: torch.Tensor, reduce: Reduce) -> float:
    """Calibration tokens over all ranks: N * T of this rank's ``h`` [N, T, D], reduced."""
    return global_count(h.shape[0] * h.shape[1], reduce, h.device)


def token_cosine_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of cos(a_t, b_t) in float64 (a scalar tensor); a, b: [..., D]."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).sum()


@torch.no_grad()
def io_similarities(
    runner: BlockRunner,
    h: torch.Tensor,
    blocks: Sequence[nn.Module],
    start: int = 0,
    reduce: Reduce = no_reduce,
    cache: InputCache | None = None,
) -> list[float]:
    """s_j = mean over tokens of cos(input of block j, output of block j), one per block.

    ``h`` is the input of ``blocks[0]``. For j < last this is cos(h_j, h_{j+1}), the similarity
    FlattenGPT ranks adjacent pairs by, and 1 - s_j is ShortGPT's block influence. Every rank passes
    its own shard of the calibration set; sums are reduced before the mean. Each block's input is
    offered to ``cache`` (numbered from ``start``).
    """
    n_tok = global_tokens(h, reduce)
    sims = []
    for i, block in enumerate(blocks):
        total = torch.zeros((), dtype=torch.float64, device=h.device)

        def accumulate(s: slice, out: torch.Tensor, h: torch.Tensor = h) -> None:
            nonlocal total  # per batch: float64 copies of one batch only, not of the whole set
            total = total + token_cosine_sum(h[s], out)

        if cache is not None:
            cache.offer(start + i, h)
        nxt = runner.run_block(block, h, f"block {start + i}", on_batch=accumulate)
        sims.append(float(reduce(total) / n_tok))
        h = nxt
    return sims


def error_rows(n: int) -> int:
    """Windows, of a rank's n, on which a parallel error is measured: the first quarter (at least one)."""
    return max(1, math.ceil(n / 4))


@torch.no_grad()
def parallel_error(
    runner: BlockRunner, second: nn.Module, h0: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor, reduce: Reduce = no_reduce
) -> float:
    """What running the pair (B_0, B_1) in parallel changes in its output, relative to that output:

        F = (h2 - h1) - (B_1(h0) - h0),    e = sum ||F||^2 / sum ||h2||^2

    h0, h1, h2 [n, T, D]: the inputs of B_0 and ``second`` (B_1) and the pair's output; h1 + B_1(h0) - h0
    is the two blocks run side by side on h0. The flattened block also lets each MLP see the other
    attention's output (u = h0 + A_0 + A_1), a second-order difference, so e is its flattening error
    before pruning up to that (0.3% apart on the first pair of a tiny random model), for one run of B_1
    instead of a 2x-wide block. The input similarity cos(h0, h1) is the paper's proxy for the same error.
    Sums are reduced over ranks.
    """
    parallel = runner.run_block(second, h0, "the second block of a pair on the first's input") - h0
    f = (h2 - h1).double() - parallel.double()
    num, den = reduce(torch.stack([f.square().sum(), h2.double().square().sum()])).tolist()
    return num / den


@torch.no_grad()
def similarity_matrix(runner: BlockRunner, ids: torch.Tensor, blocks: Sequence[nn.Module], tokens: int = 4096) -> torch.Tensor:
    """Full S[i][j] = mean cos(h_i, h_j) over the first ``tokens`` calibration tokens (for reports/plots).

    Holds every block's input for that token subset only, on the CPU.
    """
    n_seq = max(1, min(len(ids), tokens // ids.shape[1]))
    h = runner.embed(ids[:n_seq])
    states = [h.cpu()]
    for i, block in enumerate(blocks):
        h = runner.run_block(block, h, f"block {i}")
        states.append(h.cpu())
    flat = torch.stack([s.reshape(-1, s.shape[-1]).double() for s in states])  # [L+1, tokens, D]
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("itd,jtd->ij", unit, unit) / unit.shape[1]
