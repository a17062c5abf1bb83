"""One forward/backward over a global batch, on megatron-core's pipeline schedules.

`wrap_model` puts megatron-core's DistributedDataParallel around the model (gradient buffers,
data-parallel and expert-data-parallel reduction); `forward_backward` runs the schedule for this
layout (no pipelining, or 1F1B across pipeline stages) and finishes the gradients (DP/EP reduce,
sequence-parallel norms and gates summed over TP, embedding sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .. import parallel
from ..model.llama import lm_inputs
from ..model.moe import routing_stats as moe_stats
from ..model.moe.layer import AuxLossInjector
from ..parallel.mcore import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    get_forward_backward_func,
)


def wrap_model(
    model: torch.nn.Module,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
    overlap_param_gather: bool = False,
) -> DistributedDataParallel:
    """With `overlap_grad_reduce`, each bucket of `bucket_size` parameters starts its data-parallel
    reduction as soon as the last micro-batch's backward has produced all its gradients, as
    Megatron-LM sets it up: earlier micro-batches run under ddp.no_sync, and the pipeline
    schedules start the reduction of a stage's remaining buckets (grad_sync_func).

    With `overlap_param_gather` (distributed optimizer only), the optimizer step leaves the
    parameters' all-gather to the next forward pass: megatron-core's forward pre-hooks gather
    bucket i+1 while the modules of bucket i compute. Until then the bf16 parameters are those of
    the previous step: call TrainOptimizer.finish_param_sync() before reading them elsewhere
    (saving a checkpoint, exporting)."""
    if overlap_param_gather and not use_distributed_optimizer:
        raise ValueError("overlap_param_gather needs the distributed optimizer")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
        overlap_param_gather=overlap_param_gather,
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    ddp.config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        ddp.config.no_sync_func = ddp.no_sync
        ddp.config.grad_sync_func = ddp.start_grad_sync
    return ddp


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    position_ids, labels, loss_mask = lm_inputs(tokens)
    # Every stage gets the tokens (cheap); megatron-core's GPTModel uses what its stage needs.
    output = model(tokens, position_ids, None, labels=labels)

    def loss_func(per_token_loss):
        lm_loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum()
        # clone: the schedule divides the returned loss in place by the number of micro-batches
        return lm_loss, {"lm_loss": lm_loss.detach().clone()}

    return output, loss_func


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Iterable[torch.Tensor],
    num_microbatches: int,
    forward_only: bool = False,
    stats_hook: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run the schedule over `num_microbatches` micro-batches of tokens [b, s] (already on the
    device). Returns, on every rank, the mean LM loss and the summed balance loss over the
    micro-batches (NaN-safe floats), reduced across pipeline stages.

    `stats_hook(i, moe_stats.last())`, if given, sees the routing statistics of micro-batch i
    (this stage's MoE layers) after its forward pass."""
    micro_batches = list(micro_batches)
    b, s = micro_batches[0].shape
    AuxLossInjector.scale = 1.0 / num_microbatches
    balance_sum = torch.zeros((), dtype=torch.float64)
    n_mb = 0

    def counting_iterator():
        nonlocal balance_sum, n_mb
        for mb in micro_batches:
            if n_mb:
                bl = moe_stats.balance_loss()
                if bl is not None:
                    balance_sum += bl.double().cpu()
                if stats_hook is not None:
                    stats_hook(n_mb - 1, moe_stats.last())
            moe_stats.clear()
            n_mb += 1
            yield mb

    it = counting_iterator()
    func = get_forward_backward_func()
    losses = func(
        forward_step_func=_forward_step,
        data_iterator=it,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    last = moe_stats.balance_loss()
    if last is not None:
        balance_sum += last.double().cpu()
    if stats_hook is not None and n_mb:
        stats_hook(n_mb - 1, moe_stats.last())
    lm = torch.zeros((), dtype=torch.float64)
    if parallel.is_last_stage() and losses:
        lm = torch.stack([x["lm_loss"].double().cpu() for x in losses]).mean()
    # Stages own different layers: sum the balance losses over stages, take the LM loss from
    # the last stage (others hold 0).
    both = torch.stack([lm, balance_sum / num_microbatches])
    if parallel.pp_size() > 1:  # on the device: NCCL reduces device tensors only
        both = both.to(micro_batches[0].device)
        torch.distributed.all_reduce(both, group=parallel.pp_group())
        both = both.cpu()
    return {"lm_loss": both[0].item(), "balance_loss": both[1].item()}


def _eval_step(data_iterator, model):
    tokens = next(data_iterator)
    position_ids, labels, loss_mask = lm_inputs(tokens)
    output = model(tokens, position_ids, None, labels=labels)

    def loss_func(per_token_loss):
        per_sample = (per_token_loss.float() * loss_mask).sum(1) / loss_mask.sum(1)
        return per_sample.mean(), {"per_sample": per_sample.detach().double().cpu()}

    return output, loss_func


@torch.no_grad()
def forward_eval(
    model: torch.nn.Module,
    micro_batches: Iterable[torch.Tensor],
    stats_hook: Callable[[int, dict], None] | None = None,
) -> torch.Tensor:
    """Forward-only pass over micro-batches of tokens [b, s] (every micro-batch the same shape).
    Returns the LM loss of every sample (float64, CPU, in order) on every rank, taken from the
    last pipeline stage. `stats_hook` as in forward_backward."""
    micro_batches = list(micro_batches)
    b, s = micro_batches[0].shape
    n_mb = 0

    def iterator():
        nonlocal n_mb
        for mb in micro_batches:
            if n_mb and stats_hook is not None:
                stats_hook(n_mb - 1, moe_stats.last())
            moe_stats.clear()
            n_mb += 1
            yield mb

    func = get_forward_backward_func()
    out = func(
        forward_step_func=_eval_step,
        data_iterator=iterator(),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    if stats_hook is not None and n_mb:
        stats_hook(n_mb - 1, moe_stats.last())
    moe_stats.clear()
    n = sum(mb.shape[0] for mb in micro_batches)
    losses = torch.zeros(n, dtype=torch.float64)
    if parallel.is_last_stage() and out:
        losses = torch.cat([x["per_sample"] for x in out])
    if parallel.pp_size() > 1:
        dev = micro_batches[0].device
        t = losses.to(dev)
        torch.distributed.all_reduce(t, group=parallel.pp_group())
        losses = t.cpu()
    return losses
