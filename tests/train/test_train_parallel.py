"""Two gloo processes, TP=2 with sequence parallelism: the trainer's optimizer computes the same
gradient norm on both ranks (experts included: they are not tensor-parallel, megatron-core would
count them on TP rank 0 only) and the replicated weights stay identical across ranks."""

import torch

from tests.distributed import launch
from tests.train import fixtures as F


def _tp2_steps(steps):
    import torch.distributed as dist

    from megamoe import parallel
    from megamoe.config import OptimConfig
    from megamoe.model import lora
    from megamoe.model.llama import build_model
    from megamoe.train.optim import TrainOptimizer
    from megamoe.train.step import forward_backward, wrap_model

    m, e = F.tiny_configs(True)
    layout = parallel.ParallelLayout(2, 1, 1, sequence_parallel=True)
    parallel.initialize(layout, seed=3, num_experts=e.num_experts)
    out = {}
    for mode in ("fpt", "lora"):
        model = build_model(m, e, layout)
        if mode == "lora":
            lora.apply_lora(model, lora.LoRASpec(rank=4, dropout=0.0, seed=1))
            for n, p in model.named_parameters():  # non-zero B, as after some training
                if "lora" in n and "B" in n:
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(7))
        ddp = wrap_model(model)
        opt = TrainOptimizer(
            ddp,
            model,
            OptimConfig(learning_rate=1e-2, max_grad_norm=0.5),
            bf16=False,
            use_distributed_optimizer=False,
        )
        g = torch.Generator().manual_seed(11)
        norms = []
        for _ in range(steps):
            tokens = torch.randint(0, F.VOCAB, (4, F.SEQ), generator=g)
            ddp.zero_grad_buffer()
            opt.zero_grad()
            forward_backward(ddp, list(tokens.split(2)), 2)
            ok, norm = opt.step()
            assert ok
            norms.append(norm)
        worst = 0.0
        for n, p in model.named_parameters():
            if getattr(p, "tensor_model_parallel", False) and ".experts." not in n:
                continue  # TP-sharded: different on purpose
            both = [torch.zeros_like(p.data) for _ in range(2)]
            dist.all_gather(both, p.data.contiguous())
            worst = max(worst, (both[0] - both[1]).abs().max().item())
        out[mode] = (norms, worst)
    parallel.destroy()
    return out


def test_tp2_grad_norm_and_replicas_agree():
    r0, r1 = launch.run(_tp2_steps, 2, 3)
    for mode in ("fpt", "lora"):
        assert r0[mode][0] == r1[mode][0], (mode, r0[mode][0], r1[mode][0])
        assert all(x > 0.5 for x in r0[mode][0])  # clipping was active
        assert r0[mode][1] == 0.0 and r1[mode][1] == 0.0, (mode, r0[mode][1], r1[mode][1])
