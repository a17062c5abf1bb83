"""Token dispatch (permute) and combine (weighted unpermute) for the MoE layer.

The layer routes T tokens of hidden size d to k experts each (``topk_idx [T, k]``). Copy (t, j) of
token t has flat index ``i = t*k + j``. :func:`make_routing` sorts the copies by expert (stably, so
within an expert rows keep token order) and records ``row_id_map[i]``, the row of copy i in the
expert-contiguous buffer, plus ``tokens_per_expert``. Then

- :func:`dispatch`: ``out[row_id_map[t*k+j]] = x[t]``                          ([T, d] -> [num_rows, d])
- :func:`combine`:  ``out[t] = sum_j scale * scores[t, j] * y[row_id_map[t*k+j]]``  ([num_rows, d] -> [T, d])
  (num_rows = T*k without dropped copies)
  (a plain sum, without ``scale``, when ``scores`` is None: LLaMA-MoE's ``multiply_gate_scores=False``)

Dropped copies: an expert id of -1 in ``topk_idx`` means copy (t, j) goes nowhere; pass
``make_routing(..., num_rows=N)`` with N the number of kept copies (the expert-parallel layer learns
it from its count exchange, in the host sync it needs anyway for the all-to-all's split sizes).
N is checked on CPU; on CUDA only with ``MEGAMOE_DEBUG_DISPATCH=1`` (the kernels assert rows < N).
Dropped copies get ``row_id_map = -1``, are not counted, are skipped by dispatch, add nothing in
combine and get a zero score gradient. The expert-parallel layer marks the copies other ranks serve this way.

Both are differentiable (w.r.t. x; y and scores). Sums are accumulated in fp32 (float64 for float64
inputs) and written in the input's dtype; score gradients come back in the scores' dtype.

The kernels live in the C++/CUDA extension ``megamoe._C`` (csrc/), registered as
``torch.ops.megamoe.{make_routing, permute, unpermute, unpermute_backward}`` for CPU and CUDA tensors. Nothing here
synchronises with the host on CUDA. :func:`make_routing_reference`, :func:`dispatch_reference` and
:func:`combine_reference` are a
slow pure-PyTorch definition of the same maths, used by the tests; they replace the extension only
when it is missing *and* ``MEGAMOE_ALLOW_REFERENCE_DISPATCH=1`` is set.

Set ``MEGAMOE_DEBUG_DISPATCH=1`` to range-check expert indices on CUDA as well (this synchronises);
on CPU they are always checked.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "Routing",
    "make_routing",
    "check_topk_idx",
    "make_routing_reference",
    "dispatch",
    "combine",
    "dispatch_reference",
    "combine_reference",
    "HAVE_EXTENSION",
]

_ALLOW_REFERENCE_ENV = "MEGAMOE_ALLOW_REFERENCE_DISPATCH"
_DEBUG_ENV = "MEGAMOE_DEBUG_DISPATCH"


def _load_extension():
    try:
        from ... import _C  # loading the library registers torch.ops.megamoe.*
    except ImportError as e:
        if os.environ.get(_ALLOW_REFERENCE_ENV) == "1":
            warnings.warn(
                f"megamoe._C is not available ({e}); {_ALLOW_REFERENCE_ENV}=1, so MoE dispatch "
                "uses the slow pure-PyTorch reference",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        raise ImportError(
            f"megamoe._C (the MoE token dispatch/combine kernels) is missing or failed to load: {e}. "
            "Run `make setup` / scripts/setup_env.sh to build megamoe._C, or set "
            f"{_ALLOW_REFERENCE_ENV}=1 to fall back to the slow pure-PyTorch reference."
        ) from e
    return _C


_ext = _load_extension()
HAVE_EXTENSION = _ext is not None
# The routing kernel's limit (shared memory per expert); more experts use make_routing_reference.
_MAX_KERNEL_EXPERTS = _ext.max_routing_experts if HAVE_EXTENSION else 0
# The CUDA routing kernel runs in one block, so its time grows with T*k: measured on an H200 it beats
# the torch ops up to about 64K copies (16384 tokens x k=4) and loses beyond.
_KERNEL_MAX_COPIES = 65536


@dataclass
class Routing:
    """Everything :func:`dispatch` and :func:`combine` need; tensors stay on the device."""

    row_id_map: (
        torch.Tensor
    )  # [T*k] int32: row of copy t*k+j in the expert-sorted buffer, -1 if dropped
    tokens_per_expert: torch.Tensor  # [E] int64, on the device
    num_tokens: int
    topk: int
    num_experts: int
    num_rows: int  # rows of the expert-sorted buffer: T*k less the dropped copies


def make_routing(topk_idx: torch.Tensor, num_experts: int, num_rows: int | None = None) -> Routing:
    """Routing metadata for ``topk_idx [T, k]`` (expert ids in [0, num_experts)), on its device.

    With ``num_rows`` (the number of copies that are not -1), expert id -1 marks a dropped copy;
    without it, every copy must go to an expert.

    No host synchronisation. The extension's ``make_routing`` op (a stable counting sort; on CUDA one
    launch of one block) is used for up to ``megamoe._C.max_routing_experts`` experts and, on CUDA,
    up to ``_KERNEL_MAX_COPIES`` token copies, where it beats the torch ops (H200, 32K copies: 36 us
    of GPU time against ~75, one launch instead of ~10); otherwise :func:`make_routing_reference`,
    which gives the same result.
    """
    num_rows = check_topk_idx(topk_idx, num_experts, num_rows)
    if (
        not HAVE_EXTENSION
        or num_experts > _MAX_KERNEL_EXPERTS
        or (topk_idx.device.type != "cpu" and topk_idx.numel() > _KERNEL_MAX_COPIES)
    ):
        return make_routing_reference(topk_idx, num_experts, num_rows)
    row_id_map, tokens_per_expert = torch.ops.megamoe.make_routing(topk_idx, num_experts)
    return Routing(
        row_id_map, tokens_per_expert, topk_idx.shape[0], topk_idx.shape[1], num_experts, num_rows
    )


def make_routing_reference(
    topk_idx: torch.Tensor, num_experts: int, num_rows: int | None = None
) -> Routing:
    """:func:`make_routing` with torch ops: a stable sort, a scatter and a searchsorted.

    Also free of host synchronisation (CUDA's bincount would synchronise, and scatter_add's atomics
    are nondeterministic), but ~10 launches and a radix sort: slower than the kernel up to ~64K
    copies, faster beyond (the kernel uses one SM).
    """
    num_rows = check_topk_idx(topk_idx, num_experts, num_rows)
    T, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    n, dev = flat.numel(), flat.device
    sorted_experts, order = torch.sort(
        flat, stable=True
    )  # order[p] = copy placed at row p; dropped (-1) first
    # ends[e+1] = copies with expert <= e; ends[0] = the dropped copies, which sort before row 0
    ends = torch.searchsorted(
        sorted_experts, torch.arange(-1, num_experts, dtype=flat.dtype, device=dev), right=True
    )
    tokens_per_expert = torch.diff(ends)
    rows = torch.arange(n, dtype=torch.int32, device=dev) - ends[0].to(torch.int32)
    row_id_map = torch.empty(n, dtype=torch.int32, device=dev)
    row_id_map.scatter_(0, order, rows.clamp_(min=-1))  # inverse permutation; dropped copies get -1
    return Routing(row_id_map, tokens_per_expert, T, k, num_experts, num_rows)


def check_topk_idx(topk_idx: torch.Tensor, num_experts: int, num_rows: int | None = None) -> int:
    """Validates the arguments (ids on CPU, or with MEGAMOE_DEBUG_DISPATCH=1) and returns the
    buffer's row count (T*k when num_rows is None)."""
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be 2-D [tokens, k], got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_idx must be int64 (or int32), got {topk_idx.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    T, k = topk_idx.shape
    if k < 1:
        raise ValueError("topk_idx has k = 0 experts per token")
    if T * k >= 2**31:
        raise ValueError(f"{T} tokens x k={k} rows do not fit the int32 row_id_map")
    if num_rows is not None and not 0 <= num_rows <= T * k:
        raise ValueError(
            f"num_rows={num_rows} must be in [0, {T * k}] (the kept copies of {T} tokens x k={k})"
        )
    if topk_idx.device.type == "cpu" or os.environ.get(_DEBUG_ENV) == "1":
        _check_expert_range(topk_idx, num_experts, num_rows)
    return T * k if num_rows is None else num_rows


def _check_expert_range(topk_idx: torch.Tensor, num_experts: int, num_rows: int | None) -> None:
    if topk_idx.numel() == 0:
        return
    # syncs on CUDA: CPU or debug flag only
    ids = topk_idx if num_rows is None else topk_idx[topk_idx != -1]
    if ids.numel():
        lo, hi = ids.min().item(), ids.max().item()
        bad = lo if lo < 0 else hi if hi >= num_experts else None
        if bad == -1:
            raise ValueError(
                "topk_idx holds expert index -1: a dropped copy needs make_routing(..., num_rows=N), "
                "N the number of kept copies"
            )
        if bad is not None:
            raise ValueError(f"topk_idx holds expert index {bad}, outside [0, {num_experts})")
    if num_rows is not None and ids.numel() != num_rows:
        raise ValueError(
            f"num_rows={num_rows} but topk_idx keeps {ids.numel()} copies (ids other than -1)"
        )


def _check_rows(name: str, t: torch.Tensor, rows: int, routing: Routing) -> None:
    if t.dim() != 2 or t.shape[0] != rows:
        raise ValueError(
            f"{name} must have shape [{rows}, hidden] for this routing "
            f"(T={routing.num_tokens}, k={routing.topk}, {routing.num_rows} rows), "
            f"got {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if t.device != routing.row_id_map.device:
        raise ValueError(
            f"{name} is on {t.device} but the routing is on {routing.row_id_map.device}"
        )


def _check_scores(scores: torch.Tensor, routing: Routing) -> None:
    want = (routing.num_tokens, routing.topk)
    if tuple(scores.shape) != want:
        raise ValueError(f"scores must have shape {list(want)}, got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if scores.device != routing.row_id_map.device:
        raise ValueError(
            f"scores are on {scores.device} but the routing is on {routing.row_id_map.device}"
        )


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_id_map, topk, num_rows):
        ctx.save_for_backward(row_id_map)
        ctx.topk = topk
        return torch.ops.megamoe.permute(x, row_id_map, topk, num_rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (row_id_map,) = ctx.saved_tensors
        # grad_x[t] = sum_j grad_out[row_id_map[t*k+j]]: an unweighted unpermute
        grad_x = torch.ops.megamoe.unpermute(grad_out.contiguous(), row_id_map, None, ctx.topk, 1.0)
        return grad_x, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, row_id_map, scores, topk, scale):
        if scores is None:
            ctx.save_for_backward(row_id_map)
        else:
            ctx.save_for_backward(row_id_map, y, scores)  # y is needed for the scores' gradient
        ctx.topk, ctx.scale, ctx.weighted, ctx.num_rows = (
            topk,
            scale,
            scores is not None,
            y.shape[0],
        )
        return torch.ops.megamoe.unpermute(y, row_id_map, scores, topk, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        if not ctx.weighted:
            (row_id_map,) = ctx.saved_tensors
            # grad_y[row_id_map[t*k+j]] = grad_out[t]: a permute
            return (
                torch.ops.megamoe.permute(grad_out, row_id_map, ctx.topk, ctx.num_rows),
                None,
                None,
                None,
                None,
            )
        row_id_map, y, scores = ctx.saved_tensors
        grad_y, grad_scores = torch.ops.megamoe.unpermute_backward(
            grad_out, y, row_id_map, scores, ctx.topk, ctx.scale
        )
        return grad_y, None, (grad_scores if ctx.needs_input_grad[2] else None), None, None


def dispatch(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T, d] -> [num_rows, d] expert-contiguous rows: ``out[row_id_map[t*k+j]] = x[t]``. Differentiable."""
    _check_rows("x", x, routing.num_tokens, routing)
    if not HAVE_EXTENSION:
        return dispatch_reference(x, routing)
    return _Permute.apply(x, routing.row_id_map, routing.topk, routing.num_rows)


def combine(
    y: torch.Tensor, routing: Routing, scores: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    """[num_rows, d] -> [T, d]: ``out[t] = sum_j scale * scores[t, j] * y[row_id_map[t*k+j]]``.

    With ``scores=None`` a plain sum and ``scale`` is not applied (as LLaMA-MoE does with
    multiply_gate_scores=False). Differentiable w.r.t. y and scores; the output has y's dtype.
    """
    _check_rows("y", y, routing.num_rows, routing)
    if scores is not None:
        _check_scores(scores, routing)
    if not HAVE_EXTENSION:
        return combine_reference(y, routing, scores, scale)
    return _Unpermute.apply(y, routing.row_id_map, scores, routing.topk, float(scale))


# --- pure-PyTorch reference (tests; fallback with MEGAMOE_ALLOW_REFERENCE_DISPATCH=1) ------------


def _token_of_copy(routing: Routing, device: torch.device) -> torch.Tensor:
    """[T*k] int64: the token t of copy i = t*k + j."""
    return torch.arange(routing.num_tokens, device=device).repeat_interleave(routing.topk)


def dispatch_reference(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """:func:`dispatch` as index_select + index_copy (differentiable through autograd)."""
    kept = torch.nonzero(routing.row_id_map >= 0).squeeze(1)
    rows = x.index_select(0, _token_of_copy(routing, x.device)[kept])  # kept copies, in copy order
    out = rows.new_zeros(routing.num_rows, x.shape[1])
    return out.index_copy(0, routing.row_id_map.long()[kept], rows)


def combine_reference(
    y: torch.Tensor, routing: Routing, scores: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    """:func:`combine` as index_select + index_add, accumulated in fp32 (float64 for float64 y)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    kept = torch.nonzero(routing.row_id_map >= 0).squeeze(1)
    rows = y.index_select(0, routing.row_id_map.long()[kept]).to(acc)  # kept copies, in copy order
    if scores is not None:
        rows = rows * (scale * scores.to(acc)).reshape(-1)[kept].reshape(-1, 1)
    out = torch.zeros(routing.num_tokens, y.shape[1], dtype=acc, device=y.device)
    return out.index_add(0, _token_of_copy(routing, y.device)[kept], rows).to(y.dtype)


# --- shapes for FakeTensor / torch.compile tracing ----------------------------------------------


def _register_fakes() -> None:
    lib = torch.library

    def make_routing_fake(topk_idx, num_experts):
        return topk_idx.new_empty(topk_idx.numel(), dtype=torch.int32), topk_idx.new_empty(
            num_experts, dtype=torch.int64
        )

    def permute_fake(x, row_id_map, topk, num_rows=-1):
        return x.new_empty(row_id_map.shape[0] if num_rows == -1 else num_rows, x.shape[1])

    def unpermute_fake(y, row_id_map, scores, topk, scale):
        return y.new_empty(row_id_map.shape[0] // topk, y.shape[1])

    def unpermute_backward_fake(grad_out, y, row_id_map, scores, topk, scale):
        return torch.empty_like(y), torch.empty_like(scores)

    for name, fn in (
        ("make_routing", make_routing_fake),
        ("permute", permute_fake),
        ("unpermute", unpermute_fake),
        ("unpermute_backward", unpermute_backward_fake),
    ):
        try:
            lib.register_fake(f"megamoe::{name}")(fn)
        except RuntimeError:  # already registered (module reloaded)
            pass


if HAVE_EXTENSION and hasattr(torch.library, "register_fake"):
    _register_fakes()
