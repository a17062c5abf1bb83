"""Co-activation graph split (MoEfication's graph method, without METIS).

Nodes are the d_ff hidden units of one FFN; the weight of edge (u, v) is the fraction of sample
tokens on which u and v are both active. A unit counts as active on a token when |h| (h =
silu(gate x) * up x, the input of down_proj) is among that token's top `active_fraction` of
units. Edges below `threshold` are dropped. The graph is cut into E parts of prescribed sizes:
1. spectral embedding: the top-E eigenvectors of D^-1/2 A D^-1/2, rows normalised;
2. balanced k-means of the embedded units (clustering.balanced_kmeans);
3. refinement: pairwise swaps between parts while they raise the weight inside parts
   (Kernighan-Lin style; sizes never change).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .clustering import balanced_kmeans
from .split import labels_to_split, resolve_sizes


class CoactivationCounter:
    """Accumulates, for one FFN, which units fire on each sample token: packed bits per token
    (d_ff / 8 bytes a token), so many layers can be sampled in one forward pass."""

    def __init__(self, d_ff: int, active_fraction: float = 0.1):
        if not 0 < active_fraction <= 1:
            raise ValueError(f"--graph-active-fraction {active_fraction} must be in (0, 1]")
        self.d_ff = d_ff
        self.top = max(1, int(round(active_fraction * d_ff)))
        self.chunks: list[np.ndarray] = []
        self.tokens = 0

    def add(self, h: torch.Tensor) -> None:
        """h: [..., d_ff] hidden activations of some tokens."""
        h = h.detach().reshape(-1, self.d_ff).abs().float()
        idx = h.topk(self.top, dim=1).indices
        active = torch.zeros_like(h, dtype=torch.bool).scatter_(1, idx, True)
        self.chunks.append(np.packbits(active.cpu().numpy(), axis=1))
        self.tokens += h.shape[0]

    def matrix(self, chunk_tokens: int = 8192, device=None) -> np.ndarray:
        """A [d_ff, d_ff]: fraction of tokens on which both units are active (zero diagonal).
        Computed on `device` (default: the GPU when there is one)."""
        if not self.tokens:
            raise ValueError("no sample tokens seen")
        device = device or _default_device()
        a = torch.zeros(self.d_ff, self.d_ff, dtype=torch.float64, device=device)
        packed = np.concatenate(self.chunks)
        for s in range(0, len(packed), chunk_tokens):
            b = torch.from_numpy(
                np.unpackbits(packed[s : s + chunk_tokens], axis=1, count=self.d_ff).astype(
                    np.float32
                )
            ).to(device)
            a += (b.T @ b).double()  # integer counts, exact in fp32 below 2^24 per chunk
        a /= self.tokens
        a.fill_diagonal_(0)
        return a.cpu().numpy()


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _top_eigenvectors(
    m: np.ndarray, k: int, seed: int, iters: int = 200, dense_limit: int = 3000
) -> np.ndarray:
    """Eigenvectors of the k largest eigenvalues of symmetric m (eigenvalues in [-1, 1]):
    a full eigendecomposition up to `dense_limit` units, orthogonal iteration above."""
    n = m.shape[0]
    if n <= dense_limit:
        _, vecs = np.linalg.eigh(m)
        return vecs[:, -k:]
    # orthogonal iteration on (m + I) / 2 (positive semi-definite, same eigenvectors)
    dev = _default_device()
    t = torch.from_numpy(m).to(dev)
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, k + 8, dtype=t.dtype, generator=g).to(dev)).Q
    for _ in range(iters):
        q = torch.linalg.qr(0.5 * (t @ q + q)).Q
    small = q.T @ t @ q  # Rayleigh-Ritz
    _, v = torch.linalg.eigh(small)
    return (q @ v[:, -k:]).cpu().numpy()


def _objective(a: np.ndarray, labels: np.ndarray, k: int) -> float:
    onehot = np.eye(k)[labels]
    return float(((a @ onehot) * onehot).sum())


def refine_partition(a: np.ndarray, labels: np.ndarray, k: int, rounds: int = 4) -> np.ndarray:
    """Raise the weight inside parts by swapping unit pairs between parts (sizes unchanged)."""
    labels = labels.copy()
    onehot = np.eye(k)[labels]
    w = a @ onehot  # w[v, j]: weight from v to part j
    for _ in range(rounds):
        improved = False
        for p in range(k):
            for q in range(p + 1, k):
                in_p, in_q = np.flatnonzero(labels == p), np.flatnonzero(labels == q)
                gp = w[in_p, q] - w[in_p, p]  # gain of moving each unit of p to q
                gq = w[in_q, p] - w[in_q, q]
                op, oq = np.argsort(-gp), np.argsort(-gq)
                m = min(len(op), len(oq))
                u, v = in_p[op[:m]], in_q[oq[:m]]
                pair_gain = gp[op[:m]] + gq[oq[:m]] - 2 * a[u, v]
                # take the leading run of positive pair gains; the gains assume one swap at a
                # time, so check the batch and fall back to the single best swap if needed
                n_pos = int(np.argmin(pair_gain > 1e-12)) if (pair_gain <= 1e-12).any() else m
                if n_pos == 0:
                    continue
                for n_take in (n_pos, 1):
                    su, sv = u[:n_take], v[:n_take]
                    before = w[in_p, p].sum() + w[in_q, q].sum()
                    labels[su], labels[sv] = q, p
                    cols = a[:, su].sum(1) - a[:, sv].sum(1)
                    w[:, p] -= cols
                    w[:, q] += cols
                    after = w[labels == p, p].sum() + w[labels == q, q].sum()
                    if after > before + 1e-12:
                        improved = True
                        break
                    labels[su], labels[sv] = p, q  # undo
                    w[:, p] += cols
                    w[:, q] -= cols
        if not improved:
            break
    return labels


def partition_graph(
    a: np.ndarray, sizes: Sequence[int], seed: int = 0, refine_rounds: int = 4
) -> np.ndarray:
    """Labels [n] cutting the weighted graph a [n, n] into len(sizes) parts of those sizes."""
    a = np.asarray(a, dtype=np.float64)
    a = 0.5 * (a + a.T)
    k = len(sizes)
    deg = a.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
    norm = a * inv[:, None] * inv[None, :]
    emb = _top_eigenvectors(norm, k, seed)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    labels = balanced_kmeans(emb, sizes, "l2", seed)
    return refine_partition(a, labels, k, refine_rounds)


def graph_split(
    a: np.ndarray,
    num_experts: int,
    seed: int = 0,
    threshold: float = 0.0,
    sizes: Sequence[int] | None = None,
    refine_rounds: int = 4,
) -> list[np.ndarray]:
    """Split from a co-activation matrix a [d_ff, d_ff] (see CoactivationCounter.matrix); edges
    with weight below `threshold` (a fraction of tokens) are dropped."""
    a = np.asarray(a, dtype=np.float64)
    if threshold > 0:
        a = np.where(a >= threshold, a, 0.0)
    sizes = resolve_sizes(a.shape[0], num_experts, sizes)
    return labels_to_split(partition_graph(a, sizes, seed, refine_rounds), num_experts)
