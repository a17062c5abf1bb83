"""One forward/backward over a global batch, on megatron-core's pipeline schedules.

`wrap_model` puts megatron-core's DistributedDataParallel around the model (gradient buffers,
data-parallel and expert-data-parallel reduction); `forward_backward` runs the schedule for this
layout (no pipelining, or 1F1B across pipeline stages) and finishes the gradients (DP/EP reduce,
sequence-parallel norms and gates summed over TP, embedding sync).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .. import parallel
from ..model.llama import lm_inputs
from ..model.moe import stats as moe_stats
from ..model.moe.layer import AuxLossInjector
from ..parallel.mcore import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    get_forward_backward_func,
)


def wrap_model(model: torch.nn.Module, use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer, bucket_size=None)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    ddp.config.finalize_model_grads_func = finalize_model_grads
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


def forward_backward(model: torch.nn.Module, micro_batches: Iterable[torch.Tensor],
                     num_microbatches: int, forward_only: bool = False) -> dict:
    """Run the schedule over `num_microbatches` micro-batches of tokens [b, s] (already on the
    device). Returns, on every rank, the mean LM loss and the summed balance loss over the
    micro-batches (NaN-safe floats), reduced across pipeline stages."""
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
            moe_stats.clear()
            n_mb += 1
            yield mb

    it = counting_iterator()
    func = get_forward_backward_func()
    losses = func(forward_step_func=_forward_step, data_iterator=it, model=model,
                  num_microbatches=num_microbatches, seq_length=s, micro_batch_size=b,
                  forward_only=forward_only)
    last = moe_stats.balance_loss()
    if last is not None:
        balance_sum += last.double().cpu()
    lm = torch.zeros((), dtype=torch.float64)
    if parallel.is_last_stage() and losses:
        lm = torch.stack([x["lm_loss"].double().cpu() for x in losses]).mean()
    # Stages own different layers: sum the balance losses over stages, take the LM loss from
    # the last stage (others hold 0).
    both = torch.stack([lm, balance_sum / num_microbatches])
    if parallel.pp_size() > 1:
        torch.distributed.all_reduce(both, group=parallel.pp_group())
    return {"lm_loss": both[0].item(), "balance_loss": both[1].item()}
