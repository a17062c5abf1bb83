"""Records (and optionally replays) every training routing decision of the real trainer.

Why: with a top-k gate, two layouts that differ only in fp32 rounding (the reduction order of
TP, EP or DP) route a token differently when its k-th and (k+1)-th gate logits are within that
rounding of each other. From that step on, the two runs train different models and their loss
curves drift apart by far more than rounding (1e-5..1e-3 after 20 steps, growing with every further
flip), whatever the parallel code does. So a layout is checked in two parts: its curve must equal
the reference to fp32 rounding up to the first step whose routing differs, and that first difference
must be a near-tie in the reference. Replaying one run's routing in another (``replay``) removes
the flips altogether, so then the whole curve must agree to rounding.

The probe wraps LlamaMoEMLP.forward (to know the layer) and TopKBalancedNoisyGate.forward (to see
the gate input). For each training forward of a MoE layer it stores the chosen experts and the
token's margin (k-th minus (k+1)-th logit over the largest |logit|, from an eager recomputation of
the logits). Calls are keyed by (step, global micro-batch, layer): call n of a layer on a rank is
micro-batch n % ga of step n // ga of that rank's data-parallel share (global micro-batch
dp_rank * ga + n % ga, as the trainer's data loader splits the global batch), and with sequence
parallelism each TP rank holds a contiguous block of the flattened [s, b] rows, in TP-rank order.
Only the noise-free top-k gate is supported (the parity tests turn gate noise off).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

Key = tuple  # (step, global micro-batch, layer)


class Probe:
    def __init__(self, ga: int, step_offset: int = 0, replay: dict | None = None):
        self.ga, self.step_offset, self.replay = ga, step_offset, replay
        self.calls: dict[int, int] = defaultdict(int)
        self.records: dict[Key, tuple] = {}
        self._layer: int | None = None
        self._saved = None

    # ---------------------------------------------------------------- patching
    def install(self) -> Probe:
        from megamoe.model.moe import gates, layer

        mlp_cls, gate_cls = layer.LlamaMoEMLP, gates.TopKBalancedNoisyGate
        self._saved = (mlp_cls, mlp_cls.forward, gate_cls, gate_cls.forward)
        mlp_fwd, gate_fwd, probe = mlp_cls.forward, gate_cls.forward, self

        def mlp_forward(mod, hidden_states, padding_mask=None):
            probe._layer = mod.layer_index
            return mlp_fwd(mod, hidden_states, padding_mask)

        def gate_forward(gate, x, reduce_fn=None, noise=None):
            out = gate_fwd(gate, x, reduce_fn, noise)
            if not gate.training:
                return out
            return probe._on_gate(gate, x, reduce_fn, out)

        mlp_cls.forward, gate_cls.forward = mlp_forward, gate_forward
        return self

    def uninstall(self) -> None:
        if self._saved:
            mlp_cls, mlp_fwd, gate_cls, gate_fwd = self._saved
            mlp_cls.forward, gate_cls.forward = mlp_fwd, gate_fwd
            self._saved = None

    # ---------------------------------------------------------------- per call
    def _key(self, layer: int) -> Key:
        from megamoe import parallel

        n = self.calls[layer]
        self.calls[layer] += 1
        return (self.step_offset + n // self.ga, parallel.dp_rank() * self.ga + n % self.ga, layer)

    def _on_gate(self, gate, x, reduce_fn, out):
        from megamoe import parallel
        from megamoe.model.moe import gates

        assert not gate.add_noise, "the routing probe supports the noise-free gate only"
        key = self._key(self._layer)
        mlp = isinstance(gate.gate_network, torch.nn.Sequential)
        first = gate.gate_network[0].weight if mlp else gate.gate_network.weight
        pre = F.linear(x, first)
        logits = F.linear(torch.tanh(pre), gate.gate_network[2].weight) if mlp else pre
        with torch.no_grad():
            top = logits.detach().float().topk(gate.k + 1, dim=1).values
            margin = (top[:, gate.k - 1] - top[:, gate.k]) / top.abs().amax(1).clamp_min(1e-30)
        if self.replay is not None:  # the same maths as the gate, on the recorded experts
            full = self.replay[key][0]
            tp, r = parallel.tp_size(), parallel.tp_rank()
            rows = full.shape[0] // tp
            idx = full[r * rows : (r + 1) * rows].to(device=x.device, dtype=torch.int64)
            chosen = logits.gather(1, idx)
            scores = F.softmax(chosen.float(), dim=1) if gate.use_softmax else chosen.float()
            importance = torch.zeros(gate.num_experts, device=x.device).index_add(
                0, idx.reshape(-1), scores.reshape(-1)
            )
            weight = gate.balance_loss_weight if gate.use_balance else 0.0
            out = gates._finish(
                idx,
                scores,
                importance,
                gates._counts(idx, gate.num_experts),
                reduce_fn,
                weight,
                lambda imp, ld: gates.cv_squared(imp) + gates.cv_squared(ld),
            )
        self.records[key] = (
            out.topk_idx.detach().to("cpu", torch.int16),
            margin.cpu(),
            parallel.tp_rank(),
        )
        return out

    # ---------------------------------------------------------------- files
    def save(self, path: str) -> None:
        torch.save(self.records, path)


def load(paths: list) -> dict:
    """Merge the ranks' records of one run: {(step, micro-batch, layer): (idx [N, k], margin [N])},
    the TP ranks' rows concatenated in rank order."""
    parts: dict = defaultdict(dict)
    for p in paths:
        for key, (idx, margin, tp_rank) in torch.load(p).items():
            parts[key][tp_rank] = (idx, margin)
    out = {}
    for key, by_rank in parts.items():
        ranks = sorted(by_rank)
        out[key] = (
            torch.cat([by_rank[r][0] for r in ranks]),
            torch.cat([by_rank[r][1] for r in ranks]),
        )
    return out


def compare(ref: dict, got: dict) -> dict:
    """Per step, the tokens whose set of experts differs between two runs, and the largest
    reference margin among them. Returns {"flips": {step: n}, "first": step or None,
    "first_margin": float, "missing": [keys of ref without a match]}."""
    flips: dict[int, int] = defaultdict(int)
    margins: dict[int, float] = defaultdict(float)
    missing = [k for k in ref if k not in got]
    for key, (a, ma) in ref.items():
        if key not in got:
            continue
        b = got[key][0]
        assert a.shape == b.shape, (key, a.shape, b.shape)
        differ = (a.sort(1).values != b.sort(1).values).any(1)
        flips[key[0]] += int(differ.sum())
        if differ.any():
            margins[key[0]] = max(margins[key[0]], ma[differ].max().item())
    steps = sorted(s for s, n in flips.items() if n)
    first = steps[0] if steps else None
    return {
        "flips": dict(flips),
        "first": first,
        "first_margin": margins[first] if first is not None else 0.0,
        "missing": missing,
    }
