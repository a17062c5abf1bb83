"""AdamW on megatron-core's optimizers, our learning-rate schedule, and clipping.

One code path on every device: megatron-core's `get_megatron_optimizer` builds the optimizer
(param groups: weight decay off for 1-D parameters (norms) and biases, expert parameters in their
own optimizer over the expert-data-parallel group), and the step runs as megatron-core's own
`step()` does (prepare grads -> global grad norm over the model-parallel groups -> clip -> step),
with one difference: the clipping is done here with `torch._foreach_mul_`, because
megatron-core 0.16.1's `clip_grad_by_total_norm_fp32` asserts that gradients are CUDA tensors.
The clip coefficient is megatron-core's: max_norm / (norm + 1e-6), applied when below 1.

What the device selects:
- CUDA: bf16 parameters with fp32 main parameters in the optimizer (--bf16), and megatron-core's
  distributed optimizer (ZeRO-1: optimizer state and main parameters sharded over data-parallel
  ranks) unless --use_distributed_optimizer false. Its checkpoint format is
  --optimizer_checkpoint_format: "fully_reshardable" (default; per-parameter tensors, gathered
  over DP while saving, so a run resumes at any TP/PP/EP/DP layout; the experts' state goes
  through the same per-expert factories as on CPU) or "dp_reshardable" (the flat DP buffers:
  no gathering, resumes at any DP size but the same TP/PP/EP layout). megatron-core's default,
  fully_sharded_model_space, fails to save on 0.16.1 ("ShardedTensor.flattened_range is not
  supported"). The format is
  recorded in the checkpoint, and loading uses the recorded one.
- CPU: megatron-core's FP32Optimizer (fp32 parameters; its distributed optimizer needs CUDA).
  Its state is checkpointed per parameter, resharding to any layout. Our experts checkpoint one
  tensor per expert (not per parameter), so the optimizer state of expert parameters is mapped
  through ShardedTensorFactory objects that split it the same way (`_expert_factories`).

Schedule (`lr_at`): for update i (0-based), linear warmup lr0 * (i + 1) / warmup for
i < warmup, then lr0 * max(final_lr_portion, 0.5 * (1 + cos(pi * progress))) with
progress = (i - warmup) / (max_steps - warmup). The weight decay of each group is
weight_decay x the group's wd_mult (0 for norms and biases).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import OptimConfig
from ..parallel.mcore import (
    OptimizerConfig,
    ShardedTensor,
    ShardedTensorFactory,
    fix_fully_reshardable_load,
    get_megatron_optimizer,
)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    lr0, w = cfg.learning_rate, cfg.warmup_steps
    if w > 0 and step < w:
        return lr0 * (step + 1) / w
    progress = min(1.0, max(0.0, (step - w) / max(1, max_steps - w)))
    return lr0 * max(cfg.final_lr_portion, 0.5 * (1.0 + math.cos(math.pi * progress)))


def schedule_state(cfg: OptimConfig, max_steps: int) -> dict:
    return {
        "learning_rate": cfg.learning_rate,
        "final_lr_portion": cfg.final_lr_portion,
        "warmup_steps": cfg.warmup_steps,
        "max_steps": max_steps,
        "weight_decay": cfg.weight_decay,
    }


class TrainOptimizer:
    def __init__(
        self,
        ddp_model: torch.nn.Module,
        model: torch.nn.Module,
        cfg: OptimConfig,
        bf16: bool,
        use_distributed_optimizer: bool,
    ):
        self.cfg = cfg
        self.model = model  # unwrapped (for its sharded state dict)
        self.distributed = use_distributed_optimizer
        # of the distributed optimizer's checkpoints; set to a checkpoint's own before loading it
        self.checkpoint_format = cfg.optimizer_checkpoint_format
        params_dtype = next(model.parameters()).dtype
        oc = OptimizerConfig(
            optimizer="adam",
            lr=cfg.learning_rate,
            min_lr=0.0,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_epsilon,
            clip_grad=0.0,  # clipped in step() (see module docstring)
            bf16=params_dtype == torch.bfloat16,
            fp16=False,
            params_dtype=params_dtype,
            use_distributed_optimizer=use_distributed_optimizer,
        )
        self.mc = get_megatron_optimizer(oc, [ddp_model])
        self.chain = list(getattr(self.mc, "chained_optimizers", [self.mc]))
        if use_distributed_optimizer:
            fix_fully_reshardable_load(self.chain)
        if torch.cuda.is_available():
            _use_fused_adam(self.chain)
        self.lr = cfg.learning_rate

    @property
    def param_groups(self):
        return self.mc.param_groups

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for g in self.mc.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = self.cfg.weight_decay * g.get("wd_mult", 1.0)

    def zero_grad(self) -> None:
        self.mc.zero_grad()

    def finish_param_sync(self) -> None:
        """With overlap_param_gather (wrap_model), gather the parameters the last step updated now
        rather than in the next forward pass (before a checkpoint or an export reads them); a
        no-op otherwise."""
        for opt in self.chain:
            for chunk in getattr(opt, "model_chunks", None) or []:
                if getattr(chunk, "use_forward_hook", False):
                    chunk.start_param_sync(force_sync=True)

    @torch.no_grad()
    def step(self) -> tuple[bool, float]:
        """(updated, global grad norm). Not updated when the norm is not finite."""
        if self.mc.prepare_grads():
            return False, float("nan")
        norm = float(self.mc.get_grad_norm())
        if not math.isfinite(norm):
            return False, norm
        clip = self.cfg.max_grad_norm
        if clip > 0:
            coeff = clip / (norm + 1.0e-6)
            if coeff < 1.0:
                for opt in self.chain:
                    if getattr(opt, "is_stub_optimizer", False):
                        continue
                    grads = [p.grad for p in opt.get_parameters() if p.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, coeff)
        return bool(self.mc.step_with_ready_grads()), norm

    # --- checkpointing (megamoe.checkpoint.save / load_optimizer call these) ---
    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False):
        if self.distributed:
            if is_loading:
                self._create_state()
            fmt = self.checkpoint_format
            sd = (
                _expert_factories(model_sharded_state_dict, self.model)
                if fmt == "fully_reshardable"
                else model_sharded_state_dict
            )
            return self.mc.sharded_state_dict(
                sd, is_loading, metadata={"distrib_optim_sharding_type": fmt}
            )
        sd = _expert_factories(model_sharded_state_dict, self.model)
        return self.mc.sharded_state_dict(sd, is_loading)

    @torch.no_grad()
    def _create_state(self) -> None:
        """Give a fresh optimizer its state before a checkpoint is loaded into it.

        megatron-core 0.16.1's DistributedOptimizer.sharded_state_dict(is_loading=True) first
        reads the Adam 'step' from the existing state, which torch's AdamW creates only at its
        first step (Megatron-LM's usual TE/Apex FusedAdam keeps it in the param groups), so a
        fresh optimizer fails an assertion there. One step with zero gradients, lr 0 and weight
        decay 0 creates the state without changing any parameter; the load overwrites it all."""
        for opt in self.chain:
            inner = getattr(opt, "optimizer", None)
            if inner is None or len(inner.state) > 0:
                continue
            saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
            for g in inner.param_groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            inner.step()
            inner.zero_grad(set_to_none=True)
            for g, (lr, wd) in zip(inner.param_groups, saved):
                g["lr"], g["weight_decay"] = lr, wd

    def load_state_dict(self, state_dict) -> None:
        with torch.no_grad():
            self.mc.load_state_dict(state_dict)

    def state_dict(self):
        return self.mc.state_dict()


def _use_fused_adam(chain) -> None:
    """torch's fused AdamW kernel for megatron-core's torch fallback (no Apex/TE FusedAdam here).

    megatron-core builds torch.optim.AdamW with its defaults, i.e. the foreach implementation,
    whose step allocates fp32 temporaries the size of all parameters (an out-of-memory at the
    end of the first step of a 16-layer LLaMA-MoE-3.5B on a 140 GB H200) and runs many kernels
    per tensor list. Set before the first step, when Adam creates its state."""
    for opt in chain:
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            if all(p.is_cuda and p.dtype == torch.float32 for p in group["params"]):
                group["foreach"], group["fused"] = False, True


def _expert_factories(model_sd: dict, model: torch.nn.Module) -> dict:
    """Replace each expert parameter's per-expert ShardedTensors (views of the parameter) by one
    ShardedTensorFactory holding the parameter itself, which megatron-core can match to the
    optimizer state and which splits any tensor of the parameter's shape into the same
    per-expert checkpoint tensors (keys `<optimizer prefix>.<param key>.<expert>`)."""
    from ..model.moe.experts import GroupedSwiGLUExperts

    sd = dict(model_sd)
    for mname, mod in model.named_modules():
        if not isinstance(mod, GroupedSwiGLUExperts):
            continue
        for pname, axis, sizes in mod.split_table():
            keys = [f"{mname}.{pname}.{mod.first_expert + j}" for j in range(len(sizes))]
            if not all(k in sd for k in keys):
                continue
            templates = [sd.pop(k) for k in keys]
            base_key = templates[0].key.rsplit(".", 1)[0]
            sd[f"{mname}.{pname}"] = ShardedTensorFactory(
                key=base_key,
                data=getattr(mod, pname),
                build_fn=_make_build(templates, sizes, axis, mod.first_expert),
                merge_fn=_make_merge(len(sizes), axis),
                replica_id=templates[0].replica_id,
            )
    return sd


def _make_build(templates: list, sizes: list, axis: int, first: int):
    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError("flattened (distributed-optimizer) expert state")
        parts = data.split(sizes, dim=axis)
        return {
            str(j): dataclasses.replace(
                t, key=f"{key}.{first + j}", data=part, dtype=part.dtype, replica_id=replica_id
            )
            for j, (t, part) in enumerate(zip(templates, parts))
        }

    return build


def _make_merge(n: int, axis: int):
    def merge(sub_state_dict):
        return torch.cat([sub_state_dict[str(j)] for j in range(n)], dim=axis)

    return merge


__all__ = ["TrainOptimizer", "lr_at", "schedule_state", "ShardedTensor"]
