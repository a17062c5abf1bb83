"""Fused kernels for a step's small elementwise work, on CUDA only, through torch.compile.

On an H200 a step spent much of its time outside the GEMMs and attention: in RMSNorm, the rotary
embedding, the SwiGLU activation, the output layer's cross-entropy and the MoE layer's routing
maths, each a chain of small kernels that read and write the activations again and again.
Compiling these pure functions fuses each into one or two kernels each way. Where megatron-core has
a switch for a fusion (SwiGLU, cross-entropy, rotary), `fused_config_flags` turns it on and we
supply only what Transformer Engine would have (the rotary kernel); the rest are ours
(RMSNorm here, the gate and the experts' SwiGLU in moe/).

CPU runs (CI, tests) stay eager, so their numerics are exactly the plain code's; on CUDA the fused
path agrees with the plain one to bf16 rounding (tests/gpu/test_fusions_gpu.py).
``MEGAMOE_COMPILE=0`` turns every fusion off (debugging, or a torch without a working inductor).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F

from ..parallel import mcore

_cache: dict = {}


def enabled(device_type: str) -> bool:
    return device_type == "cuda" and os.environ.get("MEGAMOE_COMPILE", "1") != "0"


def maybe_compile(key: Hashable, make: Callable[[], Callable], device_type: str) -> Callable:
    """The function `make()` builds, compiled once per `key` when :func:`enabled`."""
    if not enabled(device_type):
        return make()
    if key not in _cache:
        _cache[key] = torch.compile(make(), dynamic=True, fullgraph=True)
    return _cache[key]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm: normalise in fp32, cast back, then scale (HF LlamaRMSNorm's order)."""
    return maybe_compile("rms_norm", lambda: _rms_norm, x.device.type)(x, weight, eps)


def _rms_norm(x, weight, eps: float):
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


# cos and sin of the rotary angles, per angles tensor and dtype: megatron-core hands every layer the
# same cached angles tensor (RotaryEmbedding.forward is lru_cached), so they are computed once a
# shape instead of in every layer's kernels, forward and backward (H200, 4-layer step: the rotary
# kernels fell from 4.1 to 3.0 ms and the step from 88.6 to 83.0 ms)
_cos_sin: dict = {}


def _rotary(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron-core's rotary maths, compiled: t * cos + rotate_half(t) * sin, cos and sin cast to
    t's dtype as megatron-core does."""
    if freqs.shape[-1] != t.shape[-1]:  # partial rotary: megatron-core's general code, compiled
        return maybe_compile(
            ("rotary", interleaved), lambda: _partial_rotary(interleaved), t.device.type
        )(t, freqs)
    key = (id(freqs), t.dtype)
    hit = _cos_sin.get(key)
    if hit is None or hit[0] is not freqs:  # (holding freqs keeps its id from being reused)
        if len(_cos_sin) >= 16:
            _cos_sin.clear()
        hit = _cos_sin[key] = (freqs, freqs.cos().to(t.dtype), freqs.sin().to(t.dtype))
    rotate = maybe_compile(("rotate", interleaved), lambda: _rotate(interleaved), t.device.type)
    return rotate(t, hit[1], hit[2])


def _rotate(interleaved: bool):
    def rotate(t, cos, sin):
        return t * cos + mcore.rotate_half(t, interleaved) * sin

    return rotate


def _partial_rotary(interleaved: bool):
    def rotary(t, freqs):
        return mcore.unfused_rotary(t, freqs, rotary_interleaved=interleaved)

    return rotary


def fused_config_flags(device_type: str, dtype: torch.dtype) -> dict:
    """TransformerConfig fields that switch on megatron-core's fusions on this device: its fused
    SwiGLU of the dense MLP and its cross-entropy (both torch.compile-d inside megatron-core), and
    its fused-rotary hook, served by `_rotary` where Transformer Engine is absent.

    The fused cross-entropy only for bf16 models: megatron-core 0.16.1 returns its logits gradient
    in bf16 whatever the logits' dtype, which would round an fp32 model's gradients."""
    if not enabled(device_type):
        return {}
    mcore.provide_rotary_kernel(_rotary)
    flags = dict(bias_activation_fusion=True, apply_rope_fusion=True)
    if dtype == torch.bfloat16:
        flags |= dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")
    return flags
