"""Peak memory of compression and of LoRA recovery, predicted from shapes (bytes; pure arithmetic, no torch).

The terms follow the code, not a fit: what ``flatten_gpt`` holds at the worst moment of a merge step
(calibrate.py / compress.py) and what autograd keeps for one LoRA training step (lightning/module.py).
Symbols: L layers, D width, I MLP channels, H query / K KV heads of size d, V vocabulary, M = N x T
calibration tokens on this rank, b x T recovery tokens per micro-batch, e bytes per weight element.

Compression, one merge step (the pair is flattened to 2H heads / 2I channels, then pruned back):
  weights   = e (P_emb + L P_blk)                 the model; ``flatten_gpt`` keeps every original block
            + e (S + 1) P_blk                     the flattened pair (2 blocks) and, worst case, S - 1
                                                  merged blocks of earlier steps (S = merge steps)
  hidden    = A = M D e per hidden-state set; the embeddings, the pair's input and the output target
              are held throughout, plus the attention target (float32) and one running set while the
              original blocks run:  4A + M D 4
  solver    = ``solver_bytes``: the float64 statistics and the GCV/eigh working set of the attention
              stage (2Hd wide) or of the MLP stage (2I wide: Gram, eigenvectors, syevd's 2 n^2 workspace);
              with ``fit_ridge="cv"`` also the K = cv_folds per-fold Grams and cross terms, K (n^2 + n D)
              (attention: n = 2Hd, then Hd; MLP: n = I, the kept channels, gathered in a second pass)
  cache     = floor((L - 1) / s) A on the host (InputCache, stride s)
With ``offload`` only the flattened pair (2 P_blk e) of the weights is on the device; the rest stays
on the host. Under DDP every rank holds the whole model and M is the rank's share.

Recovery (LoRA on every projection, bf16 weights, frozen base; per token of the micro-batch):
  per layer  bytes saved for backward, ``layer_saved_bytes`` (60.5 D + 14 I + 4 Kd, counted on small widths)
  logits     V (e + 4 + 4 + 4 + 4): logits, their float32 copy, log-softmax, and the two float32
             gradients of the loss's backward
  plus the weights, the adapters (float32) with their gradients and two AdamW moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Shapes:
    """The sizes of a Llama-layout decoder that memory depends on."""

    layers: int  # L
    hidden: int  # D
    intermediate: int  # I
    heads: int  # H
    kv_heads: int  # K
    vocab: int  # V
    qkv_bias: bool = False  # Qwen1.5 / Qwen2 add biases to q, k and v
    tied_embeddings: bool = False  # lm_head shares the embedding matrix

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def block_params(self) -> int:
        """P_blk: q, o [D, Hd]; k, v [D, Kd]; gate, up, down [D, I]; two norms; q/k/v biases."""
        d, hd, kd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = hd + 2 * kd if self.qkv_bias else 0
        return 2 * d * hd + 2 * d * kd + 3 * d * self.intermediate + 2 * d + bias

    @property
    def embedding_params(self) -> int:
        """P_emb: input embeddings, lm_head (unless tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    def params(self, layers: int | None = None) -> int:
        return self.embedding_params + (self.layers if layers is None else layers) * self.block_params

    def with_layers(self, layers: int) -> Shapes:
        return Shapes(layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab, self.qkv_bias, self.tied_embeddings)


# The published configs (config.json on the Hugging Face hub) of the models in configs/:
#   meta-llama/Llama-2-7b-hf:     hidden 4096, intermediate 11008, 32 layers, 32 heads, 32 KV heads, vocab 32000
#   meta-llama/Meta-Llama-3-8B:   hidden 4096, intermediate 14336, 32 layers, 32 heads,  8 KV heads, vocab 128256
#   mistralai/Mistral-7B-v0.1:    hidden 4096, intermediate 14336, 32 layers, 32 heads,  8 KV heads, vocab 32000
#   Qwen/Qwen1.5-7B:              hidden 4096, intermediate 11008, 32 layers, 32 heads, 32 KV heads, vocab 151936,
#                                 q/k/v biases
# None ties its embeddings.
SHAPES: dict[str, Shapes] = {
    "llama2-7b": Shapes(32, 4096, 11008, 32, 32, 32000),
    "llama3-8b": Shapes(32, 4096, 14336, 32, 8, 128256),
    "mistral-7b": Shapes(32, 4096, 14336, 32, 8, 32000),
    "qwen1.5-7b": Shapes(32, 4096, 11008, 32, 32, 151936, qkv_bias=True),
}


@dataclass(frozen=True)
class Peak:
    """Predicted peak bytes on the compute device and on the host (per process), with the parts."""

    device: float
    host: float
    parts: dict[str, float]


def hidden_set_bytes(tokens: int, hidden: int, elem: int) -> int:
    """A = M D e: one [N, T, D] set of calibration hidden states."""
    return tokens * hidden * elem


def cached_sets(layers: int, stride: int | None) -> int:
    """Hidden-state sets the InputCache keeps on the host (positions s, 2s, ... below L; none for stride 0)."""
    s = math.isqrt(max(layers - 1, 0)) + 1 if stride is None else stride
    return 0 if s == 0 else (layers - 1) // s


def fold_stats_bytes(width: int, out: int, folds: int) -> int:
    """Float64 per-fold statistics of one ``fit_ridge="cv"`` fit: K Grams [n, n], cross terms [n, D], ||Y||^2 [K].

    Kept beside the summed statistics only when K > 1 (one fold is the sum itself): 8 K (n^2 + n D + 1).
    """
    return 8 * folds * (width * width + width * out + 1) if folds > 1 else 0


def solver_bytes(shapes: Shapes, folds: int = 1) -> float:
    """The largest float64 working set of one prune step: max(attention stage, MLP stage).

    Attention (n = 2Hd flattened head width, k = Hd kept, D out): Gram n^2 and cross term n D held
    while the kept block k^2, its cross term k D, the prior W0^T, G W0^T and the residual cross term
    (3 k D) live, and then either eigh's eigenvectors and workspace (3 k^2) in the GCV search plus its
    k D product, or G + lam I, the identity, the Cholesky factor and the solution of the ridge solve
    (4 k^2): 8 (n^2 + nD + 5k^2 + 4kD).
    MLP (n = 2I): Gram, eigh's eigenvectors and its syevd workspace (2 n^2), cross term: 8 (4 n^2 + n D).
    ``folds`` K > 1 (``fit_ridge="cv"``): the attention stage also holds ``fold_stats_bytes`` at its full
    width n through selection, then the kept heads' k-wide copies (k = Hd); the MLP stage gathers them for
    the kept I channels only, in a second pass after selection (counted on top of the first: an upper bound).
    Input fit (``input_fit``; two parts): Gram D^2 and cross term 2 D^2 (with their K fold copies), and the
    solve's prior, residual cross term and eigenvectors (6 D^2): far below the MLP stage at real shapes.
    """
    d, n_a, k_a, n_m = shapes.hidden, 2 * shapes.heads * shapes.head_dim, shapes.heads * shapes.head_dim, 2 * shapes.intermediate
    attention = 8 * (n_a * n_a + n_a * d + 5 * k_a * k_a + 4 * k_a * d) + fold_stats_bytes(n_a, d, folds) + fold_stats_bytes(k_a, d, folds)
    mlp = 8 * (4 * n_m * n_m + n_m * d) + fold_stats_bytes(shapes.intermediate, d, folds)
    inputs = 8 * 9 * d * d + fold_stats_bytes(d, 2 * d, folds)
    return max(attention, mlp, inputs)


def compression_peak(
    shapes: Shapes,
    tokens: int,
    elem: int = 2,
    offload: bool = False,
    stride: int | None = None,
    steps: int = 1,
    on_cpu: bool = False,
    overhead: float = 0.0,
    folds: int = 1,
) -> Peak:
    """Peak bytes of ``flatten_gpt`` with ``tokens`` = N x T calibration tokens on this rank.

    ``elem``: bytes per weight (2 for bf16); ``steps``: merge steps S; ``on_cpu``: the compute device
    is the host (everything is one pool, as in this machine's runs); ``overhead``: the process's bytes
    before any model (imports), added to the host; ``folds``: cv_folds with ``fit_ridge="cv"``, else 1. On the
    CPU the weights are the memory-mapped safetensors file and count only once touched: compression never
    touches lm_head.
    """
    a = hidden_set_bytes(tokens, shapes.hidden, elem)
    untouched = shapes.vocab * shapes.hidden if on_cpu and not shapes.tied_embeddings else 0
    parts = {
        "model": float(elem * (shapes.params() - untouched)),
        "pair_and_merged": float(elem * (steps + 1) * shapes.block_params),
        "hidden": float(4 * a + tokens * shapes.hidden * max(elem, 4)),
        "solver": float(solver_bytes(shapes, folds)),
        "input_cache": float(cached_sets(shapes.layers, stride) * a),
        "overhead": float(overhead),
    }
    work = parts["hidden"] + parts["solver"]
    weights = parts["model"] + parts["pair_and_merged"]
    if on_cpu:
        total = weights + work + parts["input_cache"] + overhead
        return Peak(total, total, parts)
    if offload:
        device = 2 * elem * shapes.block_params + work
        host = weights + parts["input_cache"] + overhead
    else:
        device = weights + work
        host = max(parts["model"], parts["input_cache"]) + overhead  # loaded on the host, then moved
    return Peak(device, host, parts)


def layer_saved_bytes(shapes: Shapes) -> float:
    """Bytes autograd keeps per token per decoder layer in a bf16 LoRA step (adapters on all 7 projections).

    60.5 D + 14 I + 4 Kd (Hd = D in every config here): counted with ``torch.autograd.graph.saved_tensors_hooks``
    on the same code path (HF Llama block + peft LoRA + SDPA, bf16) at widths D 512-1024, I 1376-2752,
    Kd 128-512, excluding parameters; the 7B-width measurements in the README check it out of sample.
    I: gate, up, silu(gate) and the down adapter's dropped input and mask; Kd: rotated k and v for SDPA;
    D: the two RMSNorms' float32 input, the q/k/v/gate/up adapters' dropped inputs and masks, rotated q,
    SDPA's output and the o adapter's input.
    """
    kd = shapes.kv_heads * shapes.head_dim
    return 60.5 * shapes.hidden + 14 * shapes.intermediate + 4 * kd


def lora_params(shapes: Shapes, r: int = 8) -> int:
    """Adapter parameters: r (in + out) for q, k, v, o, gate, up, down in every layer."""
    d, i, hd, kd = shapes.hidden, shapes.intermediate, shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    per_layer = r * ((d + hd) * 2 + (d + kd) * 2 + (d + i) * 3)
    return shapes.layers * per_layer


def recovery_peak(shapes: Shapes, batch: int, seqlen: int, elem: int = 2, r: int = 8, on_cpu: bool = False, overhead: float = 0.0) -> Peak:
    """Peak bytes of one LoRA training step on ``batch`` x ``seqlen`` tokens of a ``shapes.layers``-layer model."""
    tokens = batch * seqlen
    parts = {
        "model": float(elem * shapes.params()),
        "adapters": float(lora_params(shapes, r) * 4 * 4),  # float32 weights, gradients, two AdamW moments
        "activations": float(tokens * shapes.layers * layer_saved_bytes(shapes)),
        "logits": float(tokens * shapes.vocab * (elem + 16)),
        "overhead": float(overhead),
    }
    device = parts["model"] + parts["adapters"] + parts["activations"] + parts["logits"]
    if on_cpu:
        return Peak(device + overhead, device + overhead, parts)
    return Peak(device, parts["model"] + overhead, parts)
