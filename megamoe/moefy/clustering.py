"""Clustering split: balanced k-means on the L2-normalised rows of up_proj (or gate_proj).

Balanced k-means alternates (1) a balanced assignment: every cluster j receives exactly sizes[j]
points, chosen greedily over all (point, cluster) pairs in order of increasing distance, and
(2) a centroid update (the mean; renormalised for the cosine metric). It stops when no point
changes cluster. k-means++ seeding from a seeded generator makes it deterministic. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .split import labels_to_split, resolve_sizes

METRICS = ("l2", "cosine")


def _distances(x: np.ndarray, c: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        cn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        return 1.0 - x @ cn.T
    # squared euclidean, clipped (rounding can make it slightly negative)
    d = (x * x).sum(1)[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def balanced_assign(dist: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Labels [n] with exactly sizes[j] points in cluster j (sum(sizes) == n).

    Rounds of proposals: every unassigned point proposes to its nearest cluster that still has
    room; a cluster keeps its closest proposers up to its remaining room. Each round fills a
    cluster or places every point, so there are at most k rounds."""
    n, k = dist.shape
    cap = np.asarray(sizes, dtype=np.int64).copy()
    if cap.sum() != n or len(cap) != k:
        raise ValueError(f"sizes {list(sizes)} do not match {n} points and {k} clusters")
    labels = np.full(n, -1, dtype=np.int64)
    free = np.arange(n)
    while free.size:
        d = np.where(cap[None, :] > 0, dist[free], np.inf)
        choice = d.argmin(1)
        best = d[np.arange(free.size), choice]
        for j in np.unique(choice):
            prop = np.flatnonzero(choice == j)
            take = prop[np.argsort(best[prop], kind="stable")[: cap[j]]]
            labels[free[take]] = j
            cap[j] -= take.size
        free = np.flatnonzero(labels < 0)
    return labels


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator, metric: str) -> np.ndarray:
    centers = [x[rng.integers(len(x))]]
    d = _distances(x, centers[0][None], metric)[:, 0]
    for _ in range(1, k):
        p = np.maximum(d, 0)
        total = p.sum()
        i = rng.choice(len(x), p=p / total) if total > 0 else rng.integers(len(x))
        centers.append(x[i])
        d = np.minimum(d, _distances(x, x[i][None], metric)[:, 0])
    return np.stack(centers)


def balanced_kmeans(
    x: np.ndarray, sizes: Sequence[int], metric: str = "l2", seed: int = 0, max_iter: int = 100
) -> np.ndarray:
    """Cluster the rows of x [n, d] into len(sizes) clusters of exactly the given sizes."""
    if metric not in METRICS:
        raise ValueError(f"--split-metric {metric!r}: choose one of {METRICS}")
    x = np.asarray(x, dtype=np.float64)
    k = len(sizes)
    rng = np.random.default_rng(seed)
    centers = _kmeans_pp(x, k, rng, metric)
    labels = None
    for _ in range(max_iter):
        new = balanced_assign(_distances(x, centers, metric), sizes)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            centers[j] = x[labels == j].mean(0)
    return labels


def normalize_rows(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def clustering_split(
    weight,
    num_experts: int,
    metric: str = "l2",
    seed: int = 0,
    sizes: Sequence[int] | None = None,
    max_iter: int = 100,
) -> list[np.ndarray]:
    """Split neurons by balanced k-means of the L2-normalised rows of `weight` [d_ff, d]
    (up_proj or gate_proj)."""
    w = weight.detach().float().cpu().numpy() if hasattr(weight, "detach") else np.asarray(weight)
    sizes = resolve_sizes(w.shape[0], num_experts, sizes)
    labels = balanced_kmeans(normalize_rows(w), sizes, metric, seed, max_iter)
    return labels_to_split(labels, num_experts)
