"""Expert construction: assign each of a dense FFN's d_ff neurons to experts, then slice.

A split is a list of E index arrays (neuron ids of expert j, sorted). Slicing takes rows of
gate_proj/up_proj and columns of down_proj, in megamoe's concatenated expert layout.
"""
from __future__ import annotations

import numpy as np
import torch


def random_split(d_ff: int, num_experts: int, seed: int) -> list[np.ndarray]:
    """A seeded random permutation cut into E equal parts (the released models' method)."""
    if d_ff % num_experts:
        raise ValueError(f"intermediate size {d_ff} is not divisible by {num_experts} experts")
    perm = np.random.default_rng(seed).permutation(d_ff)
    return [np.sort(part) for part in np.split(perm, num_experts)]


def slice_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, split: list[np.ndarray]):
    """Dense gate/up [d_ff, d] and down [d, d_ff] -> concatenated expert weights
    (weight_gate [S, d], weight_up [S, d], weight_down [d, S]) with S = sum of expert sizes."""
    idx = torch.as_tensor(np.concatenate(split), dtype=torch.long)
    return gate[idx].clone(), up[idx].clone(), down[:, idx].clone()
