"""LLaMA-MoE's gates: TopKBalancedNoisyGate (default) and SwitchBalancedGate.

The formulas are the released LLaMA-MoE code's (README, "The model"): routing and balance loss
must match the published model exactly, which megatron-core's TopKRouter does not. Each gate maps tokens x [T, d] to
a :class:`GateOutput`. Importance and load may be summed over sequence-parallel shards before the
balance loss (``reduce_fn``), so that TP+SP reproduces the single-process loss exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import MoEConfig
from ..fusion import maybe_compile


@dataclass
class GateOutput:
    topk_idx: torch.Tensor  # [T, k] int64
    topk_scores: torch.Tensor  # [T, k] fp32
    balance_loss: torch.Tensor  # scalar (already multiplied by the weight)
    importance: torch.Tensor  # [E]
    load: torch.Tensor  # [E]


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, Var(x) / (mean(x)^2 + eps), Var unbiased."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gate_network(hidden: int, num_experts: int, kind: str) -> nn.Module:
    """ "mlp": Linear(d->E) -> Tanh -> Linear(E->E); "linear": Linear(d->E), zero-initialised.

    Module structure gives the HF LLaMA-MoE parameter names (gate_network.0/.2 or gate_network).
    """
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(hidden, num_experts, bias=False),
            nn.Tanh(),
            nn.Linear(num_experts, num_experts, bias=False),
        )
    net = nn.Linear(hidden, num_experts, bias=False)
    nn.init.zeros_(net.weight)
    return net


class TopKBalancedNoisyGate(nn.Module):
    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts, self.k = cfg.num_experts, cfg.num_selects
        self.gate_network = gate_network(hidden, cfg.num_experts, cfg.gate_network)
        self.weight_noise = nn.Linear(hidden, cfg.num_experts, bias=False)
        nn.init.zeros_(self.weight_noise.weight)
        # Without noise the noise layer is unused: frozen, so that the optimizer leaves it as
        # loaded (Hugging Face's AdamW skips a parameter without a gradient; ours would decay it)
        # and megatron-core's overlapped gradient reduction, which waits for every trainable
        # parameter's gradient, does not wait for it.
        self.weight_noise.weight.requires_grad_(cfg.gate_add_noise)
        self.add_noise = cfg.gate_add_noise
        self.noise_epsilon = cfg.gate_noise_epsilon
        self.use_softmax = cfg.gate_use_softmax
        self.use_balance = cfg.gate_use_balance
        self.balance_loss_weight = cfg.gate_balance_loss_weight
        self.shazeer_rule = cfg.gate_load_rule == "shazeer"

    def forward(
        self,
        x: torch.Tensor,
        reduce_fn: Callable | None = None,
        noise: torch.Tensor | None = None,
    ) -> GateOutput:
        """x: [T, d]. `noise` (standard normal [T, E]) may be given for reproducible tests."""
        e, k = self.num_experts, self.k
        noisy = self.training and self.add_noise
        mlp = isinstance(self.gate_network, nn.Sequential)
        first = self.gate_network[0].weight if mlp else self.gate_network.weight
        second = self.gate_network[2].weight if mlp else None
        if noisy:  # one GEMM over x for the gate's first layer and the noise scale
            pre, noise_pre = F.linear(x, torch.cat([first, self.weight_noise.weight])).split(e, 1)
            if noise is None:
                noise = torch.randn_like(pre)
        else:
            pre, noise_pre, noise = F.linear(x, first), None, None
        key = (
            "topk_gate",
            e,
            k,
            mlp,
            noisy,
            self.noise_epsilon,
            self.use_softmax,
            self.shazeer_rule,
        )
        route = maybe_compile(
            key,
            lambda: functools.partial(
                _noisy_topk,
                k=k,
                mlp=mlp,
                noisy=noisy,
                eps=self.noise_epsilon,
                use_softmax=self.use_softmax,
                shazeer=self.shazeer_rule,
            ),
            x.device.type,
        )
        topk_idx, scores, importance, load = route(pre, second, noise_pre, noise)
        return _finish(
            topk_idx,
            scores,
            importance,
            load,
            reduce_fn,
            self.balance_loss_weight if self.use_balance else 0.0,
            lambda imp, ld: cv_squared(imp) + cv_squared(ld),
        )


def _noisy_topk(pre, second, noise_pre, noise, *, k, mlp, noisy, eps, use_softmax, shazeer):
    """The noisy top-k gate after its GEMMs over x (pure tensor maths: compiled on CUDA).

    pre: first gate layer's output [T, E]; second: the mlp gate's E x E weight (or None);
    noise_pre: the noise-scale layer's output; noise: standard normal. Returns top-k indices,
    their scores (fp32), importance and load [E] (fp32)."""
    logits_gate = F.linear(torch.tanh(pre), second) if mlp else pre
    e = logits_gate.shape[1]
    if noisy:
        noise_control = F.softplus(noise_pre) + eps
        logits_noise = noise.to(logits_gate.dtype) * noise_control
        logits = logits_gate + logits_noise
    else:
        logits = logits_gate
    top_logits, top_idx = logits.topk(min(k + 1, e), dim=1)
    topk_logits, topk_idx = top_logits[:, :k], top_idx[:, :k]
    scores = F.softmax(topk_logits.float(), dim=1) if use_softmax else topk_logits.float()
    # importance: scores scattered into [T, E] and summed over tokens
    importance = torch.zeros(e, device=pre.device, dtype=torch.float32).index_add(
        0, topk_idx.reshape(-1), scores.reshape(-1)
    )
    if noisy and k < e:
        thr_in = top_logits[:, k : k + 1]  # (k+1)-th largest noisy logit
        thr_out = top_logits[:, k - 1 : k]  # k-th largest
        is_in = (logits if shazeer else logits_noise) > thr_in
        prob_in = _normal_cdf((logits_gate - thr_in) / noise_control)
        prob_out = _normal_cdf((logits_gate - thr_out) / noise_control)
        load = torch.where(is_in, prob_in, prob_out).float().sum(0)
    else:
        load = _counts(topk_idx, e)
    return topk_idx, scores, importance, load


class SwitchBalancedGate(nn.Module):
    """Top-1 with Gumbel noise in training; loss = w * E * sum_i f_i * P_i."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate_network = gate_network(hidden, cfg.num_experts, cfg.gate_network)
        self.add_noise = cfg.gate_add_noise
        self.use_balance = cfg.gate_use_balance
        self.balance_loss_weight = cfg.gate_balance_loss_weight
        self.drop_tokens = cfg.drop_tokens
        self.capacity_factor = cfg.capacity_factor

    def forward(
        self,
        x: torch.Tensor,
        reduce_fn: Callable | None = None,
        noise: torch.Tensor | None = None,
    ) -> GateOutput:
        e = self.num_experts
        logits = self.gate_network(x).float()
        if self.training and self.add_noise:
            if noise is None:  # Gumbel(0, 1)
                noise = -torch.log(
                    -torch.log(torch.rand_like(logits).clamp_min(1e-20)).clamp_min(1e-20)
                )
            logits = logits + noise
        probs = F.softmax(logits, dim=1)
        top_idx = probs.argmax(dim=1, keepdim=True)
        scores = probs.gather(1, top_idx)
        counts = _counts(top_idx, e)
        if self.drop_tokens:
            # Tokens past an expert's capacity get no expert output (score 0): the residual
            # stream carries them unchanged, as in the published gate.
            capacity = math.floor(self.capacity_factor * x.shape[0] / e)
            onehot = F.one_hot(top_idx.reshape(-1), e)
            position = (onehot.cumsum(0) * onehot).sum(1) - 1
            scores = scores * (position < capacity).unsqueeze(1).to(scores.dtype)
        importance = probs.sum(0)

        def switch_loss(imp, cnt):
            total = cnt.sum().clamp_min(1.0)
            return e * ((cnt / total).detach() * (imp / total)).sum()

        return _finish(
            top_idx,
            scores,
            importance,
            counts,
            reduce_fn,
            self.balance_loss_weight if self.use_balance else 0.0,
            switch_loss,
        )


def _counts(idx: torch.Tensor, e: int) -> torch.Tensor:
    """Tokens routed to each expert, as float; index_add (unlike CUDA bincount) needs no host sync."""
    flat = idx.reshape(-1)
    return torch.zeros(e, device=idx.device).index_add_(
        0, flat, torch.ones(flat.numel(), device=idx.device)
    )


def _finish(topk_idx, scores, importance, load, reduce_fn, weight, loss_fn) -> GateOutput:
    if reduce_fn is not None:  # sum over the sequence-parallel shards of the same tokens
        importance, load = reduce_fn(importance), reduce_fn(load)
    if weight:
        balance = weight * loss_fn(importance, load)
    else:
        balance = importance.new_zeros(())
    return GateOutput(topk_idx, scores, balance, importance.detach(), load.detach())


def build_gate(hidden: int, cfg: MoEConfig) -> nn.Module:
    if cfg.gate_type == "SwitchBalancedGate":
        return SwitchBalancedGate(hidden, cfg)
    return TopKBalancedNoisyGate(hidden, cfg)
