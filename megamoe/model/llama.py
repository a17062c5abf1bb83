"""LLaMA and LLaMA-MoE as megatron-core GPTModels built from a layer spec.

LLaMA: RMSNorm (eps from the config, computed in fp32 as HF does), SwiGLU FFN, RoPE (HF's
rotate-half convention, which is megatron-core's non-interleaved RoPE), no biases, untied
embeddings, grouped-query attention when num_key_value_heads < num_attention_heads.
Core attention is torch's scaled_dot_product_attention (cuDNN/flash kernels on GPUs), the fastest
kernel for the GPU unless `attention_backend` names one. On CUDA, RMSNorm, the rotary embedding,
SwiGLU and the cross-entropy run fused (fusion.py).
LLaMA-MoE: the same, with every layer's mlp our LlamaMoEMLP (moe/layer.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import parallel
from ..config import ModelConfig, MoEConfig
from ..findings import raise_errors
from ..parallel.mcore import (
    MLP,
    AttnMaskType,
    GPTModel,
    IdentityOp,
    MegatronModule,
    MLPSubmodules,
    ModuleSpec,
    SelfAttention,
    SelfAttentionSubmodules,
    TransformerBlockSubmodules,
    TransformerConfig,
    TransformerLayer,
    TransformerLayerSubmodules,
    get_bias_dropout_add,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)

# megatron-core's column/row-parallel linears, whose sequence-parallel collectives overlap the GEMMs
# when parallel.set_overlap(tp_comm=True) (parallel/tp_overlap.py); megatron-core's own path otherwise
from ..parallel.tp_overlap import OverlappedColumnParallelLinear as ColumnParallelLinear
from ..parallel.tp_overlap import OverlappedRowParallelLinear as RowParallelLinear
from . import fusion
from .moe import layer as moe_layer


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalise in fp32, cast back, then scale (HF LlamaRMSNorm's order)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees other tokens: megatron-core all-reduces
        # the gradients of parameters marked so over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fusion.rms_norm(x, self.weight, self.eps)


SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@functools.cache
def auto_attention_order(device: torch.device) -> list | None:
    """The SDPA kernels "auto" tries, fastest first, on `device`; None: torch's own order.

    On Hopper (compute capability 9.x) cuDNN's attention ran causal attention at LLaMA-MoE-3.5B
    shapes 1.7x faster than the flash kernel that torch prefers (fwd+bwd, bf16, H200); torch falls
    back down the list for inputs a kernel does not take. Elsewhere torch's order stands."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    return [SDPA_BACKENDS[b] for b in ("cudnn", "flash", "efficient", "math")]


class SDPAttention(MegatronModule):
    """Causal core attention on torch.nn.functional.scaled_dot_product_attention.

    `backend` ("auto" or a key of SDPA_BACKENDS) pins the kernel for the forward, recomputed
    forwards included; autograd runs the matching backward kernel."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        backend: str = "auto",
        **unused,
    ):
        super().__init__(config=config)
        if backend != "auto" and backend not in SDPA_BACKENDS:
            raise ValueError(
                f"attention backend {backend!r}: one of auto, {', '.join(SDPA_BACKENDS)}"
            )
        self.backend = backend
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias are not supported")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.backend != "auto":
            pinned = sdpa_kernel(SDPA_BACKENDS[self.backend])
        elif order := auto_attention_order(q.device):
            pinned = sdpa_kernel(order, set_priority=True)
        else:
            pinned = contextlib.nullcontext()
        with pinned:
            out = self._sdpa(q, k, v)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1],
        )


def transformer_config(
    model: ModelConfig,
    layout: parallel.ParallelLayout,
    dtype: torch.dtype = torch.float32,
    recompute: bool = False,
) -> TransformerConfig:
    raise_errors(model.check(), exc=ValueError)
    # megatron-core's fusions that need Transformer Engine or apex stay off; those we can serve
    # on this device (fusion.py) replace the plain settings below
    plain = dict(
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    fused = fusion.fused_config_flags("cuda" if torch.cuda.is_available() else "cpu", dtype)
    return TransformerConfig(
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        **(plain | fused),
    )


def _layer_spec(mlp: ModuleSpec, attention_backend: str) -> ModuleSpec:
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=ModuleSpec(module=SDPAttention, params={"backend": attention_backend}),
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(
    config: TransformerConfig,
    model: ModelConfig,
    moe: MoEConfig | None,
    attention_backend: str = "auto",
) -> TransformerBlockSubmodules:
    """The layer specs of this pipeline stage (each MoE layer knows its global index)."""
    offset = get_transformer_layer_offset(config)
    specs = []
    for i in range(offset, offset + get_num_layers_to_build(config)):
        if moe is None:
            mlp = ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            )
        else:
            mlp = ModuleSpec(
                module=moe_layer.LlamaMoEMLP,
                params={"moe": moe, "layer_index": i, "intermediate_size": model.intermediate_size},
            )
        specs.append(_layer_spec(mlp, attention_backend))
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def build_model(
    model: ModelConfig,
    moe: MoEConfig | None = None,
    layout: parallel.ParallelLayout | None = None,
    dtype: torch.dtype = torch.float32,
    recompute: bool = False,
    meta: bool = False,
    attention_backend: str = "auto",
) -> GPTModel:
    """This rank's part of a LLaMA (moe=None) or LLaMA-MoE model. parallel.initialize() first.

    ``meta=True``: on the meta device, uninitialised (shapes and checkpoint layout only; the
    streaming converter uses it). ``attention_backend``: see SDPAttention."""
    layout = layout or parallel.ParallelLayout()
    raise_errors(
        (moe.check(model) if moe is not None else [])
        + layout.check(model, moe.num_experts if moe is not None else None),
        exc=ValueError,
    )
    config = transformer_config(model, layout, dtype, recompute)
    if meta:  # megatron-core would otherwise allocate on the GPU explicitly, not on meta
        config = dataclasses.replace(
            config, use_cpu_initialization=True, perform_initialization=False
        )
    with torch.device("meta") if meta else contextlib.nullcontext():
        gpt = _gpt(config, model, moe, attention_backend)
    if torch.cuda.is_available() and not meta:
        gpt.cuda()
    gpt.megamoe_model_config = model
    gpt.megamoe_moe_config = moe
    return gpt


def _gpt(
    config: TransformerConfig,
    model: ModelConfig,
    moe: MoEConfig | None,
    attention_backend: str = "auto",
) -> GPTModel:
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, model, moe, attention_backend),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel.is_first_stage(),
        post_process=parallel.is_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        parallel_output=True,
    )


def lm_inputs(tokens: torch.Tensor):
    """Position ids, next-token labels and loss mask for a block of `tokens` [b, s]: block t
    predicts t[1:] from t[:-1] (the last position has no label)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(b, s, device=tokens.device, dtype=torch.float32)
    loss_mask[:, -1] = 0
    return position_ids, labels, loss_mask
