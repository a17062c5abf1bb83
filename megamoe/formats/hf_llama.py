"""Hugging Face <-> megamoe parameter maps for LLaMA and LLaMA-MoE (full, unsharded tensors).

megamoe names are those of megatron-core's GPTModel built by model/llama.py at world size 1;
other layouts load a world-1 checkpoint through dist_checkpointing, which reshards.

Differences the maps take care of:
- attention: megatron-core fuses q, k, v into linear_qkv, grouped per query group
  ([q heads of group g; k_g; v_g] for g in groups); HF keeps q_proj, k_proj, v_proj.
- dense FFN: linear_fc1 = [gate_proj; up_proj] (megatron-core's GLU takes the first half as gate).
- MoE: HF LLaMA-MoE keeps one tensor per expert (calculator.experts.weight_gate.j, ...);
  megamoe concatenates the experts of a layer (experts.weight_gate [sum sizes, d], ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..config import ModelConfig, MoEConfig

Tensor = torch.Tensor


def _qkv_to_mcore(q: Tensor, k: Tensor, v: Tensor, m: ModelConfig) -> Tensor:
    ng, hn, h = m.kv_heads, m.head_dim, m.hidden_size
    per = m.num_attention_heads // ng
    return torch.cat(
        [q.reshape(ng, per * hn, h), k.reshape(ng, hn, h), v.reshape(ng, hn, h)], dim=1
    ).reshape(-1, h)


def _qkv_from_mcore(qkv: Tensor, m: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    ng, hn, h = m.kv_heads, m.head_dim, m.hidden_size
    per = m.num_attention_heads // ng
    g = qkv.reshape(ng, (per + 2) * hn, h)
    q, k, v = g.split([per * hn, hn, hn], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _gate_names(moe: MoEConfig) -> list[tuple[str, str]]:
    """(HF suffix, megamoe suffix) for the gate's tensors."""
    if moe.gate_network == "mlp":
        names = [
            ("gate.gate_network.0.weight", "gate.gate_network.0.weight"),
            ("gate.gate_network.2.weight", "gate.gate_network.2.weight"),
        ]
    else:
        names = [("gate.gate_network.weight", "gate.gate_network.weight")]
    if moe.gate_type == "TopKBalancedNoisyGate":
        names.append(("gate.weight_noise.weight", "gate.weight_noise.weight"))
    return names


def hf_to_megamoe(
    get: Callable[[str], Tensor], m: ModelConfig, moe: MoEConfig | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield megamoe (name, tensor) pairs, one layer at a time; `get(hf_name)` loads a tensor
    (so a caller can stream from sharded safetensors with bounded memory)."""
    yield "embedding.word_embeddings.weight", get("model.embed_tokens.weight")
    for i in range(m.num_hidden_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield mg + "input_layernorm.weight", get(hf + "input_layernorm.weight")
        yield (
            mg + "self_attention.linear_qkv.weight",
            _qkv_to_mcore(
                get(hf + "self_attn.q_proj.weight"),
                get(hf + "self_attn.k_proj.weight"),
                get(hf + "self_attn.v_proj.weight"),
                m,
            ),
        )
        yield mg + "self_attention.linear_proj.weight", get(hf + "self_attn.o_proj.weight")
        yield mg + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight")
        if moe is None:
            yield (
                mg + "mlp.linear_fc1.weight",
                torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], 0),
            )
            yield mg + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
            continue
        for hf_name, mg_name in _gate_names(moe):
            yield mg + "mlp." + mg_name, get(hf + "mlp." + hf_name)
        ex = hf + "mlp.calculator.experts."
        e = moe.num_experts
        yield (
            mg + "mlp.experts.weight_gate",
            torch.cat([get(f"{ex}weight_gate.{j}") for j in range(e)], 0),
        )
        yield (
            mg + "mlp.experts.weight_up",
            torch.cat([get(f"{ex}weight_up.{j}") for j in range(e)], 0),
        )
        yield (
            mg + "mlp.experts.weight_down",
            torch.cat([get(f"{ex}weight_down.{j}") for j in range(e)], 1),
        )
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    yield "output_layer.weight", get("lm_head.weight")


def megamoe_to_hf(
    get: Callable[[str], Tensor], m: ModelConfig, moe: MoEConfig | None = None
) -> Iterator[tuple[str, Tensor]]:
    """The inverse of hf_to_megamoe, one layer at a time."""
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")
    for i in range(m.num_hidden_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield hf + "input_layernorm.weight", get(mg + "input_layernorm.weight")
        q, k, v = _qkv_from_mcore(get(mg + "self_attention.linear_qkv.weight"), m)
        yield hf + "self_attn.q_proj.weight", q
        yield hf + "self_attn.k_proj.weight", k
        yield hf + "self_attn.v_proj.weight", v
        yield hf + "self_attn.o_proj.weight", get(mg + "self_attention.linear_proj.weight")
        yield hf + "post_attention_layernorm.weight", get(mg + "pre_mlp_layernorm.weight")
        if moe is None:
            gate, up = get(mg + "mlp.linear_fc1.weight").chunk(2, 0)
            yield hf + "mlp.gate_proj.weight", gate
            yield hf + "mlp.up_proj.weight", up
            yield hf + "mlp.down_proj.weight", get(mg + "mlp.linear_fc2.weight")
            continue
        for hf_name, mg_name in _gate_names(moe):
            yield hf + "mlp." + hf_name, get(mg + "mlp." + mg_name)
        sizes = moe.expert_sizes(i, m.intermediate_size)
        ex = hf + "mlp.calculator.experts."
        for name, dim in (("weight_gate", 0), ("weight_up", 0), ("weight_down", 1)):
            for j, part in enumerate(get(f"{mg}mlp.experts.{name}").split(sizes, dim)):
                yield f"{ex}{name}.{j}", part.contiguous()
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    yield "lm_head.weight", get("output_layer.weight")
