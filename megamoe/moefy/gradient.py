"""Gradient split: neuron importance |grad x activation| per cluster of sample text.

The sample sequences are grouped into E clusters (one per expert; see stats.cluster_sequences);
scores[j, i] is the sum over the tokens of cluster j of |h_i * dL/dh_i|, h the FFN hidden unit
(input of down_proj) and L the LM loss. Expert j is built from cluster j's important neurons:

- ``sharing-inner``: expert j takes the sizes[j] neurons of highest scores[j]; experts may share
  neurons (and some neurons may go unused), so the MoE is no longer an exact re-partition of the
  dense FFN.
- ``non-sharing``: experts take turns (round-robin) picking their highest-scoring neuron that no
  expert holds yet, until each has sizes[j]; with sizes summing to d_ff this partitions the FFN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .split import SplitError, resolve_sizes

VARIANTS = ("sharing-inner", "non-sharing")


def gradient_split(
    scores: np.ndarray, variant: str = "non-sharing", sizes: Sequence[int] | None = None
) -> list[np.ndarray]:
    """scores [E, d_ff] -> split. Ties are broken by neuron id (deterministic)."""
    if variant not in VARIANTS:
        raise SplitError(f"--gradient-variant {variant!r}: choose one of {VARIANTS}")
    scores = np.asarray(scores, dtype=np.float64)
    e, d_ff = scores.shape
    sizes = resolve_sizes(d_ff, e, sizes, partition=variant == "non-sharing")
    order = np.argsort(-scores, axis=1, kind="stable")  # [E, d_ff], best first
    if variant == "sharing-inner":
        return [np.sort(order[j, : sizes[j]]).astype(np.int64) for j in range(e)]
    taken = np.zeros(d_ff, dtype=bool)
    pos = np.zeros(e, dtype=np.int64)
    chosen: list[list[int]] = [[] for _ in range(e)]
    remaining = list(range(e))
    while remaining:
        still = []
        for j in remaining:
            while taken[order[j, pos[j]]]:
                pos[j] += 1
            i = order[j, pos[j]]
            taken[i] = True
            chosen[j].append(int(i))
            if len(chosen[j]) < sizes[j]:
                still.append(j)
        remaining = still
    return [np.sort(np.asarray(c, dtype=np.int64)) for c in chosen]
