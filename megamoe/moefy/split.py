"""Expert construction: assign each of a dense FFN's d_ff neurons to experts, then slice.

A split is a list of E index arrays (neuron ids of expert j, sorted). Slicing takes rows of
gate_proj/up_proj and columns of down_proj, in megamoe's concatenated expert layout.
Partitioning methods (random, clustering, graph, gradient non-sharing) give every neuron to
exactly one expert; gradient sharing-inner lets experts overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class SplitError(ValueError):
    pass


def equal_sizes(d_ff: int, num_experts: int) -> list[int]:
    if num_experts < 1:
        raise SplitError(f"--num-experts {num_experts} must be at least 1")
    if d_ff % num_experts:
        raise SplitError(
            f"intermediate_size {d_ff} is not divisible by --num-experts "
            f"{num_experts}: choose an expert count that divides it, or give "
            "unequal --expert-sizes that sum to it"
        )
    return [d_ff // num_experts] * num_experts


def resolve_sizes(
    d_ff: int, num_experts: int, sizes: Sequence[int] | None = None, partition: bool = True
) -> list[int]:
    """Expert sizes: equal (d_ff / E) when `sizes` is None, else checked. `partition`: sizes must
    sum to d_ff (every neuron in exactly one expert); otherwise each size is at most d_ff."""
    if sizes is None:
        return equal_sizes(d_ff, num_experts)
    sizes = [int(s) for s in sizes]
    if len(sizes) != num_experts:
        raise SplitError(f"--expert-sizes gives {len(sizes)} sizes for {num_experts} experts")
    if any(s < 1 for s in sizes):
        raise SplitError(f"--expert-sizes {sizes}: every expert needs at least one neuron")
    if partition and sum(sizes) != d_ff:
        raise SplitError(
            f"--expert-sizes sum to {sum(sizes)}, not intermediate_size {d_ff}: this "
            "split method gives every neuron to exactly one expert"
        )
    if not partition and max(sizes) > d_ff:
        raise SplitError(f"--expert-sizes {max(sizes)} exceeds intermediate_size {d_ff}")
    return sizes


def labels_to_split(labels: np.ndarray, num_experts: int) -> list[np.ndarray]:
    return [np.sort(np.flatnonzero(labels == j)).astype(np.int64) for j in range(num_experts)]


def random_split(
    d_ff: int, num_experts: int, seed: int, sizes: Sequence[int] | None = None
) -> list[np.ndarray]:
    """A seeded random permutation cut into E parts (equal: the released models' method)."""
    sizes = resolve_sizes(d_ff, num_experts, sizes)
    perm = np.random.default_rng(seed).permutation(d_ff)
    return [np.sort(part) for part in np.split(perm, np.cumsum(sizes)[:-1])]


def validate_split(
    split: Sequence[np.ndarray],
    d_ff: int,
    num_experts: int,
    partition: bool = False,
    where: str = "split",
) -> list[np.ndarray]:
    """Check a split: E non-empty experts of neuron ids in [0, d_ff), no id twice in an expert;
    with `partition`, every neuron in exactly one expert."""
    if len(split) != num_experts:
        raise SplitError(f"{where}: {len(split)} experts, expected {num_experts}")
    out = []
    for j, ids in enumerate(split):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise SplitError(f"{where}: expert {j} has no neurons")
        if ids.min() < 0 or ids.max() >= d_ff:
            raise SplitError(f"{where}: expert {j} has neuron ids outside [0, {d_ff})")
        if np.unique(ids).size != ids.size:
            raise SplitError(f"{where}: expert {j} lists a neuron twice")
        out.append(ids)
    if partition:
        allids = np.concatenate(out)
        if allids.size != d_ff or np.unique(allids).size != d_ff:
            raise SplitError(
                f"{where}: the experts do not partition the {d_ff} neurons "
                f"({np.unique(allids).size} distinct of {allids.size} ids)"
            )
    return out


def slice_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, split: list[np.ndarray]):
    """Dense gate/up [d_ff, d] and down [d, d_ff] -> concatenated expert weights
    (weight_gate [S, d], weight_up [S, d], weight_down [d, S]) with S = sum of expert sizes."""
    idx = torch.as_tensor(np.concatenate(split), dtype=torch.long)
    return gate[idx].clone(), up[idx].clone(), down[:, idx].clone()
