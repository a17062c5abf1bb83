"""TP=2, EP=2, PP=2 and DP=2 (two real gloo processes each) reproduce the single-process loss and
gradients of the same LLaMA-MoE model and batch."""

import pytest
import torch

from tests.distributed import launch

SEQ, VOCAB = 16, 128


def configs():
    from megamoe.config import MoEConfig
    from tests.helpers import tiny_model_config

    m = tiny_model_config(num_hidden_layers=2, vocab_size=VOCAB)
    moe = MoEConfig(
        num_experts=4, num_selects=2, gate_add_noise=False, gate_balance_loss_weight=0.1
    )
    return m, moe


def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)


def run_layout(tp, pp, ep, ckpt, dense=False, ep_chunks=1, tp_comm=False):
    """One rank: load `ckpt` at this layout, one forward/backward of the global batch (with the
    expert-parallel / tensor-parallel communication overlaps if asked)."""
    from megamoe import checkpoint, parallel
    from megamoe.model.llama import build_model
    from megamoe.train.step import forward_backward, wrap_model

    m, moe = configs()
    moe = None if dense else moe
    layout = parallel.ParallelLayout(tp, pp, ep, sequence_parallel=tp > 1)
    parallel.initialize(layout, seed=1, num_experts=moe.num_experts if moe else None)
    parallel.set_overlap(ep_chunks=ep_chunks, tp_comm=tp_comm)
    model = build_model(m, moe, layout)
    checkpoint.load_model(ckpt, model)
    ddp = wrap_model(model)
    ddp.zero_grad_buffer()
    tokens = batch()
    dp, r = parallel.dp_size(), parallel.dp_rank()
    mine = tokens[r * 2 // dp : (r + 1) * 2 // dp]  # this data-parallel rank's share
    mbs = [mine[i : i + 1] for i in range(mine.shape[0])]
    out = forward_backward(ddp, mbs, num_microbatches=len(mbs))
    losses = torch.tensor([out["lm_loss"], out["balance_loss"]], dtype=torch.float64)
    torch.distributed.all_reduce(losses, group=parallel.dp_group())
    losses /= dp
    grads = checkpoint.gather_full_state(model, grads=True)
    parallel.set_overlap()
    parallel.destroy()
    return losses.tolist(), grads


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Save a random world-1 model, and its single-process loss and gradients."""
    ckpt = str(tmp_path_factory.mktemp("ref") / "ckpt")
    launch.run(_save_reference, 1, ckpt)
    return ckpt, launch.run(run_layout, 1, 1, 1, 1, ckpt)[0]


def _save_reference(ckpt):
    from megamoe import checkpoint, parallel
    from megamoe.model.llama import build_model

    m, moe = configs()
    parallel.initialize(parallel.ParallelLayout(), seed=3)
    checkpoint.save(ckpt, build_model(m, moe), checkpoint.make_meta(m, moe))


@pytest.mark.parametrize(
    "tp,pp,ep,ep_chunks,tp_comm",
    [
        (2, 1, 1, 1, False),
        (1, 1, 2, 1, False),
        (1, 2, 1, 1, False),
        (1, 1, 1, 1, False),
        (1, 1, 2, 2, False),
        (2, 1, 1, 1, True),
    ],
    ids=["TP2+SP", "EP2", "PP2", "DP2", "EP2+overlap", "TP2+SP+overlap"],
)
def test_layout_matches_single_process(reference, tp, pp, ep, ep_chunks, tp_comm):
    ckpt, (ref_losses, ref_grads) = reference
    results = launch.run(run_layout, 2, tp, pp, ep, ckpt, False, ep_chunks, tp_comm)
    losses, grads = results[0]
    assert abs(losses[0] - ref_losses[0]) <= 1e-5 * abs(ref_losses[0]), (losses, ref_losses)
    assert abs(losses[1] - ref_losses[1]) <= 1e-5 * abs(ref_losses[1]) + 1e-7, (losses, ref_losses)
    assert ref_losses[1] > 0  # the balance loss is really there
    assert set(grads) == set(ref_grads)
    worst = max(
        ((g - ref_grads[k]).norm() / ref_grads[k].norm().clamp_min(1e-12)).item()
        for k, g in grads.items()
    )
    print(f"tp={tp} pp={pp} ep={ep}: loss {losses} vs {ref_losses}; worst grad rel err {worst:.2e}")
    assert worst < 1e-4
