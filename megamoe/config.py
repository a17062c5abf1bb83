"""Run configuration: one dataclass per concern; the command-line flags are generated from them.

Flag names are the LLaMA-MoE training guide's (``--num_selects``, ``--gate_balance_loss_weight``,
``--moe_calculator_score_scale_factor``, ``--dynamic_data_selection`` ...), so scripts written for
the published trainer read the same. A YAML/JSON file may give the same keys; flags override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union


@dataclass
class ModelConfig:
    """LLaMA shapes (HF LlamaConfig names)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None = num_attention_heads (no GQA)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible "
                             f"by num_key_value_heads {self.kv_heads}")


@dataclass
class MoEConfig:
    """LLaMA-MoE's MoE fields (HF LLaMA-MoE config names; flags in parentheses)."""

    num_experts: int = 16
    num_selects: int = 4  # top-k (--num_selects)
    # None: equal sizes intermediate_size / num_experts; else one list of sizes per layer.
    size_experts: Optional[list] = None
    gate_type: str = "TopKBalancedNoisyGate"  # or "SwitchBalancedGate" (--gate_type)
    gate_network: str = "mlp"  # "mlp" | "linear" (--gate_network_type)
    gate_use_softmax: bool = True
    gate_use_balance: bool = True
    gate_balance_loss_weight: float = 1e-2
    gate_add_noise: bool = True
    gate_noise_epsilon: float = 1e-2
    # How TopKBalancedNoisyGate decides that an expert is "in" the top-k when computing the
    # smooth load: "shazeer" compares the full noisy logit (Shazeer et al. 2017, our default);
    # "published" compares only the noise term, as the released LLaMA-MoE code does.
    gate_load_rule: str = "shazeer"
    # One float, or one per layer. None: num_experts / num_selects (--moe_calculator_score_scale_factor)
    score_scale_factor: Union[float, list, None] = None
    multiply_gate_scores: bool = True
    capacity_factor: float = 1.25  # SwitchBalancedGate with drop_tokens
    drop_tokens: bool = False

    def scale_factor(self, layer: int) -> float:
        sf = self.score_scale_factor
        if sf is None:
            return self.num_experts / self.num_selects
        if isinstance(sf, (list, tuple)):
            return float(sf[layer])
        return float(sf)

    def expert_sizes(self, layer: int, intermediate_size: int) -> list[int]:
        if self.size_experts is None:
            return [intermediate_size // self.num_experts] * self.num_experts
        return [int(s) for s in self.size_experts[layer]]

    def validate(self, model: ModelConfig) -> None:
        e, k = self.num_experts, self.num_selects
        if k < 1 or k > e:
            raise ValueError(f"--num_selects {k} must be between 1 and the number of experts {e}")
        if self.gate_type not in ("TopKBalancedNoisyGate", "SwitchBalancedGate"):
            raise ValueError(f"--gate_type {self.gate_type!r}: choose TopKBalancedNoisyGate or "
                             "SwitchBalancedGate")
        if self.gate_type == "SwitchBalancedGate" and k != 1:
            raise ValueError("SwitchBalancedGate routes each token to one expert: set --num_selects 1")
        if self.gate_network not in ("mlp", "linear"):
            raise ValueError(f"--gate_network_type {self.gate_network!r}: choose mlp or linear")
        if self.gate_load_rule not in ("shazeer", "published"):
            raise ValueError(f"gate_load_rule {self.gate_load_rule!r}: choose shazeer or published")
        layers = model.num_hidden_layers
        if self.size_experts is None:
            if model.intermediate_size % e:
                raise ValueError(f"intermediate_size {model.intermediate_size} is not divisible by "
                                 f"num_experts {e}: give size_experts or another expert count")
        else:
            if len(self.size_experts) != layers or any(len(s) != e for s in self.size_experts):
                raise ValueError(f"size_experts must hold {layers} lists of {e} sizes")
        if isinstance(self.score_scale_factor, (list, tuple)) and len(self.score_scale_factor) != layers:
            raise ValueError(f"score_scale_factor has {len(self.score_scale_factor)} values for "
                             f"{layers} layers")


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return obj


def to_dict(cfg: Any) -> dict:
    return _to_jsonable(cfg)


def from_dict(cls, data: dict):
    """Build dataclass `cls` from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)
