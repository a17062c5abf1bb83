"""LoRA adapters for LLaMA / LLaMA-MoE on megatron-core, including the experts.

Targets (``--lora_targets``, PEFT's names):

    q, k, v   the fused ``linear_qkv`` (ColumnParallelLinear): one adapter per projection, its
              output rows interleaved into megatron-core's [group][q heads, k, v] layout
    o         ``linear_proj`` (RowParallelLinear)
    gate, up  dense LLaMA: the two halves of ``linear_fc1``; LLaMA-MoE: every expert's
              ``weight_gate`` / ``weight_up`` (one adapter per expert)
    down      dense LLaMA: ``linear_fc2``; LLaMA-MoE: every expert's ``weight_down``

Each adapted weight W gets W + (alpha / r) * B A, with A (r x in) initialised as PEFT does
(Kaiming-uniform, a = sqrt(5)) from a generator seeded by the seed and the weight's global name,
so the initial adapters do not depend on the parallel layout, and B = 0 (the model's output is
unchanged at the start). Dropout acts on the adapter's input. The forward pass adds the adapter
branch computed on the activations (no merged weight is materialised); :func:`merge_lora`
folds the adapters into the weights (W += scale * B A, computed in fp32) and turns the modules
back into plain ones, so a merged model is an ordinary model for export.

Parallelism: adapters follow their base weight. Column-parallel (q,k,v, gate/up of the dense
MLP): A is replicated, B is split like the output rows; the r-wide activations A x are gathered
along the sequence under sequence parallelism (their gradient reduce-scattered back), so A's
gradient is partial per sequence shard and A is marked ``sequence_parallel`` (megatron-core sums
it over TP). Row-parallel (o, down of the dense MLP): A is split like the input columns, the
r-wide A x is summed over TP (reduce-scattered along the sequence under sequence parallelism),
B is replicated (``sequence_parallel`` under SP). Expert adapters live with their experts
(expert-parallel, ``allreduce = False``) and are checkpointed per global expert, like the
experts, so checkpoints reshard across EP sizes.

The modules are switched to subclasses in place (``module.__class__``), so parameter names and
checkpoint keys of the base weights do not change: a LoRA checkpoint holds the base weights
under their usual keys plus ``...lora_A_<t>`` / ``...lora_B_<t>`` (experts: ``lora_<t>_A.<j>``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import parallel
from ..config import LORA_TARGETS, lora_findings
from ..findings import raise_errors
from ..parallel.mcore import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    make_sharded_tensors_for_checkpoint,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from .moe.experts import GroupedSwiGLUExperts, grouped_mm_available, mark_expert_param


@dataclass
class LoRASpec:
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    train_gates: bool = True
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        raise_errors(lora_findings(self.rank, self.dropout, self.targets), exc=ValueError)

    def to_dict(self) -> dict:
        return asdict(self)


def _init_A(shape, name: str, seed: int) -> torch.Tensor:
    """PEFT's init (kaiming_uniform_, a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))) from a
    generator seeded by (seed, global name): the same on every rank and layout."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound)


def _new_param(t: torch.Tensor, like: torch.Tensor, **attrs) -> nn.Parameter:
    p = nn.Parameter(t.to(dtype=like.dtype, device=like.device).contiguous())
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


# ---------------------------------------------------------------------------------------------
# column-parallel: linear_qkv (q, k, v) and the dense linear_fc1 (gate, up)


class LoRAColumnParallelLinear(ColumnParallelLinear):
    """The output's last dim is viewed as [groups, parts]: each part (q/k/v heads of a query
    group, or the gate/up halves of fc1) may carry an adapter."""

    lora_base_class = ColumnParallelLinear

    def _lora_setup(self, parts: list, groups: int, spec: LoRASpec, name: str, in_features: int):
        self.lora_parts = parts  # [(target, rows per group)], in layout order
        self.lora_groups = groups
        self.lora_targets = [t for t, _ in parts if t in spec.targets]
        self.lora_scale, self.lora_dropout = spec.scale, spec.dropout
        sp = self.config.sequence_parallel
        for t, rows in parts:
            if t not in self.lora_targets:
                continue
            A = _init_A((spec.rank, in_features), f"{name}.lora_A_{t}", spec.seed)
            setattr(self, f"lora_A_{t}", _new_param(A, self.weight, sequence_parallel=sp))
            B = torch.zeros(rows * groups, spec.rank)  # this rank's output rows
            setattr(
                self,
                f"lora_B_{t}",
                _new_param(
                    B,
                    self.weight,
                    tensor_model_parallel=True,
                    partition_dim=0,
                    partition_stride=1,
                    sequence_parallel=False,
                ),
            )

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = super().forward(
            input_, weight=weight, runtime_gather_output=runtime_gather_output
        )
        x = F.dropout(input_, self.lora_dropout, self.training) if self.lora_dropout else input_
        deltas = {}
        for t in self.lora_targets:
            h = F.linear(x, getattr(self, f"lora_A_{t}"))
            if self.config.sequence_parallel:
                h = gather_from_sequence_parallel_region(
                    h, tensor_parallel_output_grad=True, group=parallel.tp_group()
                )
            else:
                h = copy_to_tensor_model_parallel_region(h, group=parallel.tp_group())
            deltas[t] = F.linear(h, getattr(self, f"lora_B_{t}")) * self.lora_scale
        lead = out.shape[:-1]
        o = out.reshape(*lead, self.lora_groups, -1)
        pieces, col = [], 0
        for t, rows in self.lora_parts:
            piece = o[..., col : col + rows]
            if t in deltas:
                piece = piece + deltas[t].reshape(*lead, self.lora_groups, rows)
            pieces.append(piece)
            col += rows
        return torch.cat(pieces, -1).reshape(out.shape), bias

    def lora_delta_weight(self) -> torch.Tensor:
        """scale * B A in this rank's weight layout (fp32)."""
        w = self.weight
        d = torch.zeros(
            self.lora_groups,
            w.shape[0] // self.lora_groups,
            w.shape[1],
            dtype=torch.float32,
            device=w.device,
        )
        col = 0
        for t, rows in self.lora_parts:
            if t in self.lora_targets:
                BA = getattr(self, f"lora_B_{t}").float() @ getattr(self, f"lora_A_{t}").float()
                d[:, col : col + rows] = BA.view(self.lora_groups, rows, -1) * self.lora_scale
            col += rows
        return d.view_as(w)

    def lora_param_names(self) -> list:
        return [f"lora_{ab}_{t}" for t in self.lora_targets for ab in ("A", "B")]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        axes = {"weight": 0, "bias": 0, **{f"lora_B_{t}": 0 for t in self.lora_targets}}
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            axes,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class LoRARowParallelLinear(RowParallelLinear):
    lora_base_class = RowParallelLinear

    def _lora_setup(self, target: str, spec: LoRASpec, name: str, in_features_full: int):
        self.lora_targets = [target]
        self.lora_scale, self.lora_dropout = spec.scale, spec.dropout
        tp, rank = parallel.tp_size(), parallel.tp_rank()
        A = _init_A((spec.rank, in_features_full), f"{name}.lora_A_{target}", spec.seed)
        A = A.chunk(tp, dim=1)[rank]  # this rank's input columns
        self.lora_A = _new_param(
            A, self.weight, tensor_model_parallel=True, partition_dim=1, partition_stride=1
        )
        self.lora_B = _new_param(
            torch.zeros(self.weight.shape[0], spec.rank),
            self.weight,
            sequence_parallel=self.config.sequence_parallel,
        )

    def forward(self, input_):
        out, bias = super().forward(input_)
        x = F.dropout(input_, self.lora_dropout, self.training) if self.lora_dropout else input_
        h = F.linear(x, self.lora_A)
        if self.config.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, group=parallel.tp_group())
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=parallel.tp_group())
        return out + F.linear(h, self.lora_B) * self.lora_scale, bias

    def lora_delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.lora_scale

    def lora_param_names(self) -> list:
        return ["lora_A", "lora_B"]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            {"weight": 1, "lora_A": 1},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


# ---------------------------------------------------------------------------------------------
# experts


# LoRA tensors of the experts: (name, target, neuron axis, split by) where split by is "expert"
# (r rows/cols per expert) or "size" (the expert's neurons).
_EXPERT_LORA = {
    "gate": (("lora_gate_A", 0, "expert"), ("lora_gate_B", 0, "size")),
    "up": (("lora_up_A", 0, "expert"), ("lora_up_B", 0, "size")),
    "down": (("lora_down_A", 1, "size"), ("lora_down_B", 1, "expert")),
}


class LoRAGroupedSwiGLUExperts(GroupedSwiGLUExperts):
    """Expert j: gate_j(x) = W_gate_j x + s B_gate_j A_gate_j x (likewise up); down_j(h) =
    W_down_j h + s B_down_j A_down_j h. Stored concatenated in expert order like the weights:
    lora_gate_A [E*r, d], lora_gate_B [S, r], lora_down_A [r, S], lora_down_B [d, E*r]."""

    lora_base_class = GroupedSwiGLUExperts

    def _lora_setup(self, spec: LoRASpec, name: str):
        self.lora_targets = [t for t in ("gate", "up", "down") if t in spec.targets]
        self.lora_scale, self.lora_dropout, self.lora_rank = spec.scale, spec.dropout, spec.rank
        r, d = spec.rank, self.weight_down.shape[0]
        like = self.weight_gate
        for t in self.lora_targets:
            if t in ("gate", "up"):
                A = torch.cat(
                    [
                        _init_A((r, d), f"{name}.{self.first_expert + j}.lora_{t}_A", spec.seed)
                        for j in range(self.num_experts)
                    ],
                    0,
                )
                B = torch.zeros(sum(self.sizes), r)
            else:
                A = torch.cat(
                    [
                        _init_A((r, s), f"{name}.{self.first_expert + j}.lora_down_A", spec.seed)
                        for j, s in enumerate(self.sizes)
                    ],
                    1,
                )
                B = torch.zeros(d, self.num_experts * r)
            setattr(self, f"lora_{t}_A", mark_expert_param(_new_param(A, like)))
            setattr(self, f"lora_{t}_B", mark_expert_param(_new_param(B, like)))

    def lora_split_table(self) -> list:
        """[(param name, axis, split sizes)] of the adapters, for per-expert checkpoint tensors."""
        out = []
        for t in self.lora_targets:
            for pname, axis, by in _EXPERT_LORA[t]:
                sizes = [self.lora_rank] * self.num_experts if by == "expert" else self.sizes
                out.append((pname, axis, sizes))
        return out

    def lora_param_names(self) -> list:
        return [n for n, _, _ in self.lora_split_table()]

    # per-expert slices of the adapters
    def _ab(self, t: str, j: int, col: int, s: int):
        r = self.lora_rank
        A, B = getattr(self, f"lora_{t}_A"), getattr(self, f"lora_{t}_B")
        if t == "down":
            return A[:, col : col + s], B[:, j * r : (j + 1) * r]
        return A[j * r : (j + 1) * r], B[col : col + s]

    def _lora(self, x, t, j, col, s):
        A, B = self._ab(t, j, col, s)
        if self.lora_dropout:
            x = F.dropout(x, self.lora_dropout, self.training)
        return F.linear(F.linear(x, A), B) * self.lora_scale

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.equal and grouped_mm_available(x) and (self.lora_rank * x.element_size()) % 16 == 0:
            return self._forward_grouped_lora(x, tokens_per_expert)
        counts = tokens_per_expert.tolist()
        outs, row, col = [], 0, 0
        for j, (n, s) in enumerate(zip(counts, self.sizes)):
            xe = x[row : row + n]
            g = F.linear(xe, self.weight_gate[col : col + s])
            u = F.linear(xe, self.weight_up[col : col + s])
            if "gate" in self.lora_targets:
                g = g + self._lora(xe, "gate", j, col, s)
            if "up" in self.lora_targets:
                u = u + self._lora(xe, "up", j, col, s)
            h = F.silu(g) * u
            o = F.linear(h, self.weight_down[:, col : col + s])
            if "down" in self.lora_targets:
                o = o + self._lora(h, "down", j, col, s)
            outs.append(o)
            row, col = row + n, col + s
        if not outs:
            return x.new_zeros(0, self.weight_down.shape[0])
        return torch.cat(outs, 0)

    def _forward_grouped_lora(self, x, tokens_per_expert):
        e, s, d, r = self.num_experts, self.sizes[0], x.shape[1], self.lora_rank
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        gm = torch._grouped_mm
        drop = (
            (lambda t: F.dropout(t, self.lora_dropout, self.training))
            if self.lora_dropout
            else (lambda t: t)
        )

        def in_proj(w, t):
            y = gm(x, w.view(e, s, d).transpose(1, 2), offs=offs)
            if t in self.lora_targets:
                A, B = getattr(self, f"lora_{t}_A"), getattr(self, f"lora_{t}_B")
                xa = gm(drop(x), A.view(e, r, d).transpose(1, 2), offs=offs)
                y = y + gm(xa, B.view(e, s, r).transpose(1, 2), offs=offs) * self.lora_scale
            return y

        h = F.silu(in_proj(self.weight_gate, "gate")) * in_proj(self.weight_up, "up")
        y = gm(h, self.weight_down.view(d, e, s).permute(1, 2, 0), offs=offs)
        if "down" in self.lora_targets:
            A, B = self.lora_down_A, self.lora_down_B
            ha = gm(drop(h), A.view(r, e, s).permute(1, 2, 0), offs=offs)
            y = y + gm(ha, B.view(d, e, r).permute(1, 2, 0), offs=offs) * self.lora_scale
        return y

    def lora_delta_weights(self) -> dict:
        """{weight name: scale * B A per expert, in the weight's layout (fp32)}."""
        out = {}
        names = {"gate": "weight_gate", "up": "weight_up", "down": "weight_down"}
        for t in self.lora_targets:
            w = getattr(self, names[t])
            d = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            col = 0
            for j, s in enumerate(self.sizes):
                A, B = self._ab(t, j, col, s)
                BA = (B.float() @ A.float()) * self.lora_scale
                if t == "down":
                    d[:, col : col + s] = BA
                else:
                    d[col : col + s] = BA
                col += s
            out[names[t]] = d
        return out

    def split_table(self) -> list:
        return super().split_table() + self.lora_split_table()


# ---------------------------------------------------------------------------------------------
# applying, freezing, merging


def _layers(model):
    return list(model.decoder.layers)


def apply_lora(model: nn.Module, spec: LoRASpec) -> dict:
    """Add adapters to `model` (this rank's part) in place and freeze everything else (the MoE
    gates stay trainable with spec.train_gates). Returns counts for the log."""
    spec.validate()
    targets = set(spec.targets)
    n_modules = 0
    for layer in _layers(model):
        g = layer.layer_number - 1  # global, 0-based
        attn = layer.self_attention
        if targets & {"q", "k", "v"}:
            qkv = attn.linear_qkv
            ng = attn.num_query_groups_per_partition
            hpg = attn.num_attention_heads_per_partition // ng
            hd = attn.hidden_size_per_attention_head
            qkv.__class__ = LoRAColumnParallelLinear
            qkv._lora_setup(
                [("q", hpg * hd), ("k", hd), ("v", hd)],
                ng,
                spec,
                f"layers.{g}.self_attn",
                qkv.weight.shape[1],
            )
            n_modules += 1
        if "o" in targets:
            proj = attn.linear_proj
            proj.__class__ = LoRARowParallelLinear
            proj._lora_setup(
                "o", spec, f"layers.{g}.self_attn.o_proj", proj.weight.shape[1] * parallel.tp_size()
            )
            n_modules += 1
        mlp = layer.mlp
        if isinstance(getattr(mlp, "experts", None), GroupedSwiGLUExperts):
            if targets & {"gate", "up", "down"}:
                mlp.experts.__class__ = LoRAGroupedSwiGLUExperts
                mlp.experts._lora_setup(spec, f"layers.{g}.mlp.experts")
                n_modules += 1
        elif hasattr(mlp, "linear_fc1"):
            if targets & {"gate", "up"}:
                fc1 = mlp.linear_fc1
                half = fc1.weight.shape[0] // 2
                fc1.__class__ = LoRAColumnParallelLinear
                fc1._lora_setup(
                    [("gate", half), ("up", half)], 1, spec, f"layers.{g}.mlp", fc1.weight.shape[1]
                )
                n_modules += 1
            if "down" in targets:
                fc2 = mlp.linear_fc2
                fc2.__class__ = LoRARowParallelLinear
                fc2._lora_setup(
                    "down",
                    spec,
                    f"layers.{g}.mlp.down_proj",
                    fc2.weight.shape[1] * parallel.tp_size(),
                )
                n_modules += 1
    for name, p in model.named_parameters():  # freezes only: what the model froze stays frozen
        p.requires_grad_(p.requires_grad and is_trainable_in_lora(name, spec))
    model.megamoe_lora = spec
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"modules": n_modules, "trainable": trainable, "total": total}


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def is_trainable_in_lora(name: str, spec: LoRASpec) -> bool:
    return is_adapter_param(name) or (spec.train_gates and ".mlp.gate." in name)


def lora_modules(model: nn.Module) -> Iterable[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_base_class")]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight (W += scale * B A, in fp32, then cast), remove the
    adapters and turn the modules back into their base classes. Returns how many merged."""
    n = 0
    for m in lora_modules(model):
        if isinstance(m, LoRAGroupedSwiGLUExperts):
            for wname, delta in m.lora_delta_weights().items():
                w = getattr(m, wname)
                w.copy_((w.float() + delta).to(w.dtype))
        else:
            w = m.weight
            w.copy_((w.float() + m.lora_delta_weight()).to(w.dtype))
        for pname in m.lora_param_names():
            delattr(m, pname)
        for attr in (
            "lora_targets",
            "lora_scale",
            "lora_dropout",
            "lora_parts",
            "lora_groups",
            "lora_rank",
        ):
            if attr in m.__dict__:
                delattr(m, attr)
        m.__class__ = m.lora_base_class
        n += 1
    if hasattr(model, "megamoe_lora"):
        del model.megamoe_lora
    return n
