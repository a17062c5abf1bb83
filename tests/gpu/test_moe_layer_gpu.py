"""The MoE layer on a GPU: grouped-GEMM experts vs the per-expert loop, forward and backward, and
the whole layer on CUDA vs the same layer on the CPU."""

import pytest
import torch

from tests.helpers import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_grouped_mm_experts_match_loop():
    from megamoe.model.moe.experts import GroupedSwiGLUExperts
    from tests.unit.test_grouped_swiglu import grouped_vs_loop

    torch.manual_seed(0)
    ex = GroupedSwiGLUExperts(256, [128] * 8, dtype=torch.bfloat16).cuda()
    counts = torch.tensor([0, 40, 7, 0, 100, 33, 1, 75], device="cuda")  # zero-token experts too
    for name, a, b in grouped_vs_loop(ex, counts, torch.bfloat16, "cuda"):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


def test_layer_cuda_matches_cpu(world1):
    from megamoe import parallel
    from megamoe.config import MoEConfig
    from megamoe.model.llama import transformer_config
    from megamoe.model.moe.layer import LlamaMoEMLP
    from tests.helpers import tiny_model_config

    torch.manual_seed(1)
    m = tiny_model_config(hidden_size=128, intermediate_size=512)
    cfg = transformer_config(m, parallel.ParallelLayout(), torch.float32)
    moe = MoEConfig(num_experts=8, num_selects=2, gate_add_noise=False)
    # megatron-core's convention: use_cpu_initialization=False (the default with CUDA) puts
    # the experts straight on the GPU; the CPU copy asks for CPU initialisation
    cfg.use_cpu_initialization = True
    cpu = LlamaMoEMLP(cfg, moe, layer_index=0, intermediate_size=512).train()
    cfg.use_cpu_initialization = False
    gpu = LlamaMoEMLP(cfg, moe, layer_index=0, intermediate_size=512).cuda().train()
    assert gpu.experts.weight_gate.is_cuda
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(64, 2, 128)
    res = []
    for layer, dev in ((cpu, "cpu"), (gpu, "cuda")):
        xi = x.to(dev).detach().requires_grad_()  # a leaf on each device (x.to("cpu") is x itself)
        y, _ = layer(xi)
        (y * y).sum().backward()
        # weight_noise gets no gradient with gate_add_noise=False: compare the ones that do
        res.append(
            [y.detach().cpu(), xi.grad.cpu()]
            + [p.grad.cpu() for p in layer.parameters() if p.grad is not None]
        )
    assert len(res[0]) == len(res[1]) == 2 + len(list(cpu.parameters())) - 1
    for a, b in zip(*res):
        assert rel_err(a, b) < 1e-4, rel_err(a, b)
