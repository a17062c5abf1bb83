"""Hugging Face config.json for LLaMA (LlamaForCausalLM) and LLaMA-MoE (LlamaMoEForCausalLM).

Reading accepts the configs transformers 4.x writes (``rope_theta``, ``rope_scaling``,
``torch_dtype``) and 5.x writes (``rope_parameters``, ``dtype``). Writing produces the 4.x
layout, which both read, and which the LLaMA-MoE remote code (transformers 4.x era) expects.
The LLaMA-MoE fields are those the released LLaMA-MoE configs carry (README, "Checkpoints").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import ModelConfig, MoEConfig

CONFIG = "config.json"


class HFFormatError(ValueError):
    """A Hugging Face directory or file that cannot be converted (names the file and the fix)."""


def _refuse(path: str, findings) -> None:
    bad = [f.text() for f in findings if f.is_error]
    if bad:
        raise HFFormatError(f"{path}: " + "; ".join(bad))


def _dtype_name(cfg: dict) -> str | None:
    return cfg.get("torch_dtype") or cfg.get("dtype")


def read_config_json(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / CONFIG
    if not Path(hf_dir).is_dir():
        raise HFFormatError(f"--hf-dir {hf_dir}: no such directory")
    if not path.is_file():
        raise HFFormatError(
            f"{path}: not found; --hf-dir must be a Hugging Face model directory "
            "(config.json plus *.safetensors or pytorch_model*.bin)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path}: not valid JSON ({e})") from None


def _rope_theta(cfg: dict, path: str) -> float:
    rp = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if isinstance(rp, dict):
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default":
            raise HFFormatError(
                f"{path}: rope_parameters type {kind!r} is not supported (only "
                "plain RoPE, as in LLaMA-1/2)"
            )
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    if scaling:
        kind = (
            scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        )
        if kind not in (None, "default"):
            raise HFFormatError(
                f"{path}: rope_scaling {scaling!r} is not supported (only plain "
                "RoPE, as in LLaMA-1/2)"
            )
    return float(cfg.get("rope_theta", 10000.0))


def model_config_from_hf(cfg: dict, path: str = CONFIG) -> ModelConfig:
    """The LLaMA shapes of an HF llama or llama_moe config.json; refuses what megamoe cannot
    compute exactly (biases, other activations, rope scaling, tied embeddings are handled by the
    caller)."""
    mt = cfg.get("model_type")
    if mt not in ("llama", "llama_moe"):
        raise HFFormatError(
            f"{path}: model_type {mt!r} is not LLaMA; hf-to-megamoe converts "
            "model_type 'llama' (LlamaForCausalLM) or 'llama_moe' (LLaMA-MoE)"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [k for k in required if k not in cfg]
    if missing:
        raise HFFormatError(f"{path}: missing {missing}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise HFFormatError(f"{path}: hidden_act {act!r}: LLaMA's FFN is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise HFFormatError(f"{path}: {flag} is true; megamoe's LLaMA has no biases")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise HFFormatError(
            f"{path}: pretraining_tp {cfg['pretraining_tp']} is not supported; "
            "set it to 1 (it only changes how HF computes, not the weights)"
        )
    m = ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=cfg.get("num_key_value_heads"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg, path),
    )
    if m.num_key_value_heads == m.num_attention_heads:
        m.num_key_value_heads = None
    _refuse(path, m.check())
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != m.head_dim:
        raise HFFormatError(
            f"{path}: head_dim {head_dim} differs from hidden_size / "
            f"num_attention_heads = {m.head_dim}; not supported"
        )
    return m


_MOE_FIELDS = (
    "num_experts",
    "num_selects",
    "size_experts",
    "gate_type",
    "gate_network",
    "gate_use_softmax",
    "gate_use_balance",
    "gate_balance_loss_weight",
    "gate_add_noise",
    "gate_noise_epsilon",
    "gate_load_rule",
    "score_scale_factor",
    "multiply_gate_scores",
    "capacity_factor",
    "drop_tokens",
)


def moe_config_from_hf(cfg: dict, m: ModelConfig, path: str = CONFIG) -> MoEConfig:
    """The MoE fields of an HF LLaMA-MoE config.json (model_type llama_moe)."""
    for k in ("num_experts", "num_selects"):
        if k not in cfg:
            raise HFFormatError(f"{path}: model_type llama_moe without {k}")
    calc = cfg.get("calculator_type", "UniversalCalculator")
    if calc not in ("UniversalCalculator", "SwitchDropTokenCalculator"):
        raise HFFormatError(f"{path}: calculator_type {calc!r} is not supported")
    if cfg.get("add_weight_norm"):
        raise HFFormatError(f"{path}: add_weight_norm true is not supported")
    kw = {k: cfg[k] for k in _MOE_FIELDS if k in cfg}
    if "gate_network" not in kw and "gates" in cfg:  # some LLaMA-MoE configs name it "gates"
        kw["gate_network"] = cfg["gates"]
    if "score_scale_factor" not in kw and "moe_calculator_score_scale_factor" in cfg:
        kw["score_scale_factor"] = cfg["moe_calculator_score_scale_factor"]
    moe = MoEConfig(**kw)
    e = moe.num_experts
    if moe.size_experts is not None:
        sizes = moe.size_experts
        if isinstance(sizes, list) and len(sizes) == e and all(isinstance(s, int) for s in sizes):
            sizes = [list(sizes) for _ in range(m.num_hidden_layers)]  # one list for all layers
        moe.size_experts = [[int(s) for s in layer] for layer in sizes]
        if len(sizes) != m.num_hidden_layers or any(len(layer) != e for layer in sizes):
            raise HFFormatError(
                f"{path}: size_experts must hold {m.num_hidden_layers} lists "
                f"(one per layer) of {e} expert sizes"
            )
        if (
            all(s == m.intermediate_size // e for layer in moe.size_experts for s in layer)
            and m.intermediate_size % e == 0
        ):
            moe.size_experts = None  # equal sizes: the canonical form
    _refuse(path, moe.check(m))
    return moe


def _llama_fields(m: ModelConfig, dtype: str) -> dict:
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_hidden_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


def llama_config_dict(
    m: ModelConfig, dtype: str = "float32", extra: dict[str, Any] | None = None
) -> dict:
    """config.json of an HF LlamaForCausalLM."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_llama_fields(m, dtype)}
    cfg.update(extra or {})
    return cfg


def llama_moe_config_dict(
    m: ModelConfig, moe: MoEConfig, dtype: str = "float32", extra: dict[str, Any] | None = None
) -> dict:
    """config.json of an HF LLaMA-MoE model, with every MoE field of the released configs."""
    sf = moe.score_scale_factor
    if sf is None:
        sf = moe.num_experts / moe.num_selects
    elif isinstance(sf, (list, tuple)):
        sf = [float(s) for s in sf]
    else:
        sf = float(sf)
    cfg = {
        "architectures": ["LlamaMoEForCausalLM"],
        "model_type": "llama_moe",
        **_llama_fields(m, dtype),
        "num_experts": moe.num_experts,
        "num_selects": moe.num_selects,
        "size_experts": None
        if moe.size_experts is None
        else [[int(s) for s in layer] for layer in moe.size_experts],
        "gate_type": moe.gate_type,
        "gate_network": moe.gate_network,
        "gate_use_softmax": moe.gate_use_softmax,
        "gate_use_balance": moe.gate_use_balance,
        "gate_balance_loss_weight": moe.gate_balance_loss_weight,
        "gate_add_noise": moe.gate_add_noise,
        "gate_noise_epsilon": moe.gate_noise_epsilon,
        "gate_load_rule": moe.gate_load_rule,  # megamoe's; ignored by the remote code
        "calculator_type": (
            "SwitchDropTokenCalculator"
            if moe.gate_type == "SwitchBalancedGate"
            else "UniversalCalculator"
        ),
        "multiply_gate_scores": moe.multiply_gate_scores,
        "score_scale_factor": sf,
        "add_weight_norm": False,
        "drop_tokens": moe.drop_tokens,
        "dropped_padding": "zero",
        "capacity_factor": moe.capacity_factor,
    }
    cfg.update(extra or {})
    return cfg


def write_config_json(out_dir: str | os.PathLike, cfg: dict) -> None:
    (Path(out_dir) / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
