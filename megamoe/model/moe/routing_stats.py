"""Per-layer routing statistics of the last forward pass, for logging.

The MoE layers write here (detached values only); the trainer reads and clears after each
micro-batch. Keyed by global layer index, so pipeline stages each hold their own layers.
"""

from __future__ import annotations

import torch

_last: dict[int, dict[str, torch.Tensor]] = {}


def record(layer: int, gate_output) -> None:
    _last[layer] = {
        "balance_loss": gate_output.balance_loss.detach(),
        "importance": gate_output.importance,
        "load": gate_output.load,
        "topk_idx": gate_output.topk_idx,
    }


def last() -> dict[int, dict[str, torch.Tensor]]:
    return _last


def balance_loss() -> torch.Tensor | None:
    """Sum of the balance losses of this stage's layers in the last forward pass."""
    if not _last:
        return None
    return torch.stack([v["balance_loss"].float() for v in _last.values()]).sum()


def clear() -> None:
    _last.clear()
