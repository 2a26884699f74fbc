"""Channel pruning of a flattened block back to the original width (docs/DESIGN.md section 1.3).

Pure functions on tensors: head importance and GQA group selection, ridge-leverage (Nystrom)
selection of MLP channels, the ridge least-squares correction of an output projection, and keeping
the selected heads/channels of a block's ``BlockWeights`` (the adapter writes them back into modules).
Statistics come in as float64 sums.
"""

from __future__ import annotations

import torch

from flatten_lightning.adapters import Affine, BlockWeights


def head_importance(z_norm_sum: torch.Tensor, n_tokens: int, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Paper's head score f_i = E_tokens[||z_i||] * ||W_O,i||_F, shape [n_heads].

    ``z_norm_sum`` [n_heads]: sum over tokens of the norm of head i's output z_i (input of o_proj);
    ``o_weight`` [D, n_heads * d]: its columns for head i are W_O,i.
    """
    w = o_weight.double().view(o_weight.shape[0], -1, head_dim)  # [D, n_heads, d]
    col_norm = w.pow(2).sum(dim=(0, 2)).sqrt()
    return z_norm_sum.double() / n_tokens * col_norm


def head_leverage(gram: torch.Tensor, lam: float, head_dim: int) -> torch.Tensor:
    """Ridge leverage of each head's output columns, summed per head: [n_heads].

    ``gram`` [n_heads * d, n_heads * d] = Z^T Z of the concatenated head outputs z_i (o_proj's input).
    As for MLP channels (Nystrom), a head scores by how much of the span of all heads' outputs its own
    columns carry: a head whose output others reproduce scores low, since o_proj is re-fitted anyway.
    """
    return ridge_leverage(gram, lam).view(-1, head_dim).sum(dim=1)


def select_kv_groups(scores: torch.Tensor, n_rep: int, n_keep: int) -> torch.Tensor:
    """Indices (sorted) of the ``n_keep`` KV groups with the largest summed query-head score.

    A group is KV head j with its query heads j*n_rep .. (j+1)*n_rep - 1, so the kept heads still
    satisfy query head i -> KV head i // n_rep after re-indexing.
    """
    group_scores = scores.view(-1, n_rep).sum(dim=1)
    if not 0 < n_keep <= group_scores.numel():
        raise ValueError(f"cannot keep {n_keep} of {group_scores.numel()} KV groups")
    return top_sorted(group_scores, n_keep)


def top_sorted(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` largest ``scores``, in increasing order (kept heads/channels keep their order)."""
    return torch.topk(scores, n_keep).indices.sort().values


def heads_of_groups(groups: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Query-head indices belonging to KV groups ``groups`` (in order)."""
    return (groups[:, None] * n_rep + torch.arange(n_rep)[None, :]).reshape(-1)


def mean_eigenvalue(c: torch.Tensor) -> float:
    """Mean singular value of a PSD matrix = trace / n."""
    return float(torch.diagonal(c).sum() / c.shape[0])


def ridge_leverage(c: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge leverage scores diag(C (C + lam I)^-1) of the PSD Gram matrix C [n, n] (float64).

    C (C + lam I)^-1 = I - lam (C + lam I)^-1, and with the Cholesky factor C + lam I = L L^T,
    diag((C + lam I)^-1)_i = sum_j ((L^-1)_ji)^2: one factorisation and one triangular inverse, about
    4x faster than an eigendecomposition at n = 3072 (the flattened MLP of SmolLM2), same numbers to ~1e-15.
    """
    c = c.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    chol, info = torch.linalg.cholesky_ex(c + lam * eye)
    if lam > 0 and int(info) == 0:
        inv_l = torch.linalg.solve_triangular(chol, eye, upper=False)
        return 1.0 - lam * inv_l.pow(2).sum(dim=0)
    evals, evecs = torch.linalg.eigh(c)  # lam = 0 (or C + lam I numerically singular): the spectral form
    # Eigenvalues below n eps max(e) are rounding of a null direction (LAPACK may return them as +1e-17,
    # which e / (e + 0) would count as a full unit of leverage): zero them, as a numerical rank does.
    evals = torch.where(evals > c.shape[0] * torch.finfo(c.dtype).eps * evals.max().clamp_min(0.0), evals, 0.0)
    return (evecs.pow(2) * (evals / (evals + lam).clamp_min(torch.finfo(c.dtype).tiny))[None, :]).sum(dim=1)


def select_channels(c: torch.Tensor, n_keep: int, lam: float) -> torch.Tensor:
    """Indices (sorted) of the ``n_keep`` channels with the largest ridge leverage under C."""
    if not 0 < n_keep <= c.shape[0]:
        raise ValueError(f"cannot keep {n_keep} of {c.shape[0]} channels")
    return top_sorted(ridge_leverage(c, lam), n_keep)


def select_by_loss(c: torch.Tensor, cross: torch.Tensor, n_keep: int, lam: float, unit: int = 1, rounds: int = 24) -> torch.Tensor:
    """Indices (sorted) of ``n_keep`` units (runs of ``unit`` columns) chosen by what dropping the others costs
    the ridge fit; units are MLP channels (unit 1) or whole KV groups of head outputs.

    ``c`` [n, n] = Phi^T Phi, ``cross`` [n, D] = Phi^T Y (Y what the projection should output). The best fit
    on columns S leaves E(S) = ||Y||^2 - tr(B_S^T (C_SS + lam I)^-1 B_S). With P = (C_SS + lam I)^-1 and
    W = P B_S, dropping a set M of S raises E by tr(W_M^T P_MM^-1 W_M): for one unit g, its saliency
    tr(W_g^T P_gg^-1 W_g) (Optimal Brain Surgeon's, with the rest re-fitted). Backward elimination in ``rounds``
    rounds (one unit per round where fewer are dropped): each drops the units of least saliency and updates P and W exactly (P <- P_RR - P_RM P_MM^-1 P_MR,
    W <- W_R - P_RM P_MM^-1 W_M). Unlike the leverage score it sees the target: a unit whose output others
    reproduce, or that the target does not need, goes first.
    """
    n = c.shape[0] // unit
    if not 0 < n_keep <= n:
        raise ValueError(f"cannot keep {n_keep} of {n} channels")
    if n_keep == n:
        return torch.arange(n)
    c = c.double()
    lam = max(lam, 1e-9 * mean_eigenvalue(c))  # no ridge (a plain fit): a trace of one keeps P defined for dead channels
    a = c.clone()
    a.diagonal().add_(lam)
    chol = torch.linalg.cholesky(a)
    del a  # at most three n x n matrices live (C, the factor, P): memory.solver_bytes' MLP bound is 4 n^2
    p = torch.cholesky_inverse(chol)
    del chol
    w = p @ cross.double()
    alive = torch.arange(n, device=c.device)
    per_round = -(-(n - n_keep) // rounds)
    while len(alive) > n_keep:
        g = len(alive)
        blocks = torch.diagonal(p.view(g, unit, g, unit), dim1=0, dim2=2).permute(2, 0, 1)  # P_gg [g, unit, unit]
        wg = w.view(g, unit, -1)
        saliency = (wg * torch.linalg.solve(blocks, wg)).sum(dim=(1, 2))
        drop = torch.zeros(g, dtype=torch.bool, device=c.device)
        drop[torch.topk(saliency, min(per_round, g - n_keep), largest=False).indices] = True
        cols = drop.repeat_interleave(unit)
        r, m = (~cols).nonzero().squeeze(1), cols.nonzero().squeeze(1)
        p_rm = p[r[:, None], m]
        gain = torch.linalg.solve(p[m[:, None], m], torch.cat([p_rm.T, w[m]], dim=1))  # P_MM^-1 [P_MR, W_M]
        p = torch.addmm(p[r[:, None], r], p_rm, gain[:, : len(r)], alpha=-1.0)
        w = torch.addmm(w[r], p_rm, gain[:, len(r) :], alpha=-1.0)
        alive = alive[~drop]
    return alive.sort().values.cpu()


def channel_energy(sq_sum: torch.Tensor, n_tokens: int, down_weight: torch.Tensor) -> torch.Tensor:
    """Score of MLP channel j from its own statistics only: sqrt(E_tokens[psi_j^2]) * ||W_down[:, j]||, shape [2I].

    ``sq_sum`` [2I]: sum over tokens of psi_j^2 (the diagonal of C); ``down_weight`` [D, 2I]. The size of
    channel j's contribution to the block output, as ``head_importance`` is for heads; unlike the ridge
    leverage it ignores what other channels already span, and it needs no 2I x 2I Gram.
    """
    return (sq_sum.double() / n_tokens).sqrt() * down_weight.double().norm(dim=0)


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge least squares: W^T = (G + lam I)^-1 B, with G = Phi^T Phi [n, n], B = Phi^T Y [n, D].

    Returns W^T [n, D]; the new projection weight is its transpose [D, n]. With the flattened block
    as target (Y = Phi_full W_full^T) this is the paper's (C_SS + lam I)^-1 C_S: W^T (Lemma 3.1).
    """
    g = gram.double()
    a = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    try:
        chol = torch.linalg.cholesky(a)
        return torch.cholesky_solve(cross.double(), chol)
    except torch.linalg.LinAlgError:
        # Singular without ridge (e.g. lam = 0 and a dead channel): fall back to the pseudo-inverse.
        return torch.linalg.lstsq(a, cross.double(), driver="gelsd" if a.device.type == "cpu" else None).solution


# Relative ridge strengths (times the mean eigenvalue of the Gram) that GCV chooses from.
GCV_GRID = tuple(10.0**e for e in range(-6, 2))


def gcv_ridge(gram: torch.Tensor, cross: torch.Tensor, yy: float, n: int, grid: tuple[float, ...] = GCV_GRID) -> float:
    """Ridge strength minimising generalized cross-validation, from streamed statistics only.

    With G = Phi^T Phi = U diag(e) U^T, B = Phi^T Y, yy = ||Y||_F^2 and n samples, the ridge fit
    W^T = (G + lam I)^-1 B has residual RSS = yy - sum_i ||(U^T B)_i||^2 (2 f_i - e_i f_i^2) with
    f_i = 1 / (e_i + lam), and df = sum_i e_i f_i; GCV(lam) = RSS / (1 - df / n)^2. Returns lam
    (absolute) for the best relative strength in ``grid`` (times the mean eigenvalue of G).
    """
    evals, evecs = torch.linalg.eigh(gram.double())
    evals = evals.clamp_min(0.0)
    bb = (evecs.T @ cross.double()).pow(2).sum(dim=1)
    scale = float(evals.mean())
    best, best_lam = float("inf"), grid[0] * scale
    for rel in grid:
        lam = rel * scale
        f = 1.0 / (evals + lam)
        rss = yy - float((bb * (2 * f - evals * f * f)).sum())
        df = float((evals * f).sum())
        if df >= n:
            continue  # as many effective parameters as samples: no estimate of the error
        score = rss / (1.0 - df / n) ** 2
        if score < best:
            best, best_lam = score, lam
    return best_lam


# Relative ridge strengths cross-validation by windows chooses from: quarter decades, 1e-3 to 10.
CV_GRID = tuple(10.0 ** (e / 4) for e in range(-12, 5))


def cv_ridge(grams: torch.Tensor, crosses: torch.Tensor, yys: torch.Tensor, grid: tuple[float, ...] = CV_GRID) -> float:
    """Relative ridge minimising K-fold cross-validation over held-out windows, from per-fold statistics.

    Fold k holds G_k = Phi_k^T Phi_k, B_k = Phi_k^T Y_k, yy_k = ||Y_k||^2 of its windows ([K, n, n],
    [K, n, D], [K]). Its fit leaves them out: W_k^T = (G_-k + lam_k I)^-1 B_-k, G_-k = sum_{j != k} G_j,
    lam_k = rel * mean eig(G_-k), and its error on them is
    E_k(rel) = yy_k - 2 <W_k^T, B_k> + <W_k^T, G_k W_k^T>. With G_-k = U diag(e) U^T, f = 1 / (e + lam_k),
    Bt = U^T B_-k, Bk = U^T B_k and Gk = U^T G_k U: E_k = yy_k - 2 f . rowsum(Bt o Bk) + f^T (Gk o Bt Bt^T) f,
    so each rel costs n^2 after one eigendecomposition per fold. Returns the rel in ``grid`` with least
    sum_k E_k. Unlike GCV, whose rows are tokens, a fold holds out whole windows, whose tokens are correlated.
    """
    g, b = grams.double().sum(dim=0), crosses.double().sum(dim=0)
    total = torch.zeros(len(grid), dtype=torch.float64, device=g.device)
    rel = torch.tensor(grid, dtype=torch.float64, device=g.device)
    for k in range(len(grams)):
        evals, u = torch.linalg.eigh(g - grams[k].double())
        evals = evals.clamp_min(0.0)
        bt, bk = u.T @ (b - crosses[k].double()), u.T @ crosses[k].double()
        quad = (u.T @ grams[k].double() @ u) * (bt @ bt.T)
        f = 1.0 / (evals[None, :] + rel[:, None] * evals.mean().clamp_min(1e-300))  # [grid, n]
        total += float(yys[k]) - 2.0 * f @ (bt * bk).sum(dim=1) + ((f @ quad) * f).sum(dim=1)
    return grid[int(total.argmin())]


def rows(p: Affine, idx: torch.Tensor) -> Affine:
    """Keep output rows ``idx`` of a projection (and of its bias)."""
    idx = idx.to(p.weight.device)
    return Affine(p.weight[idx], None if p.bias is None else p.bias[idx])


def cols(p: Affine, idx: torch.Tensor, weight: torch.Tensor | None = None) -> Affine:
    """Keep input columns ``idx``; ``weight`` [out, len(idx)] replaces them when given (a correction)."""
    new = p.weight[:, idx.to(p.weight.device)] if weight is None else weight.to(p.weight)
    return Affine(new, p.bias)


def unit_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units (heads) of ``size`` rows each."""
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def keep_heads(w: BlockWeights, kv_groups: torch.Tensor, n_rep: int, head_dim: int, o_weight: torch.Tensor | None = None) -> BlockWeights:
    """Keep KV groups ``kv_groups`` (and their query heads) of ``w``.

    ``o_weight`` [D, len(heads) * d], if given, is the corrected output projection for the kept heads.
    """
    q_rows = unit_rows(heads_of_groups(kv_groups, n_rep), head_dim)
    kv_rows = unit_rows(kv_groups, head_dim)
    return w.with_(q=rows(w.q, q_rows), k=rows(w.k, kv_rows), v=rows(w.v, kv_rows), o=cols(w.o, q_rows, o_weight))


def keep_channels(w: BlockWeights, channels: torch.Tensor, down_weight: torch.Tensor | None = None) -> BlockWeights:
    """Keep MLP channels ``channels`` of ``w``; ``down_weight`` [D, len(channels)] is the correction."""
    gate = None if w.gate is None else rows(w.gate, channels)
    return w.with_(gate=gate, up=rows(w.up, channels), down=cols(w.down, channels, down_weight))
