"""Gates against a plain PyTorch transcription of the released LLaMA-MoE gate formulas, forward and
backward, on fresh random inputs."""

import math

import pytest
import torch

from megamoe.config import MoEConfig
from megamoe.model.moe.gates import SwitchBalancedGate, TopKBalancedNoisyGate, cv_squared


def ref_cv2(x):
    x = x.double()
    n = x.numel()
    mean = x.sum() / n
    var = ((x - mean) ** 2).sum() / (n - 1)
    return var / (mean**2 + 1e-10)


def ref_topk_gate(gate, x, noise, k, rule):
    """Direct transcription of the formulas, token by token where it helps readability."""
    h = gate.gate_network(x)
    sigma = torch.nn.functional.softplus(gate.weight_noise(x)) + gate.noise_epsilon
    noisy = h + noise * sigma
    t, e = h.shape
    scores = torch.zeros(t, e, dtype=torch.float32)
    load = torch.zeros(e, dtype=torch.float64)
    phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    idx_all = []
    for i in range(t):
        order = torch.argsort(noisy[i], descending=True)
        top = order[:k]
        idx_all.append(top)
        s = torch.softmax(noisy[i, top].float(), 0)
        scores[i] = scores[i].index_put((top,), s)
        thr_in, thr_out = noisy[i, order[k]], noisy[i, order[k - 1]]
        for j in range(e):
            in_ = (noisy[i, j] if rule == "shazeer" else noise[i, j] * sigma[i, j]) > thr_in
            thr = thr_in if in_ else thr_out
            load[j] = load[j] + phi((h[i, j] - thr) / sigma[i, j])
    importance = scores.sum(0)
    loss = gate.balance_loss_weight * (ref_cv2(importance) + ref_cv2(load))
    return torch.stack(idx_all), scores, importance, load, loss


@pytest.mark.parametrize("rule", ["shazeer", "published"])
@pytest.mark.parametrize("network", ["mlp", "linear"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_gate_matches_formulas(rule, network, k):
    torch.manual_seed(100 + k)
    cfg = MoEConfig(num_experts=8, num_selects=k, gate_network=network, gate_load_rule=rule)
    gate = TopKBalancedNoisyGate(16, cfg).double().train()
    with torch.no_grad():  # the released init zeroes these; randomise so the test sees them
        for p in gate.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(40, 8, dtype=torch.float64)
    out = gate(x, noise=noise)
    idx, scores, imp, load, loss = ref_topk_gate(gate, x, noise, k, rule)
    assert torch.equal(out.topk_idx, idx)
    dense = torch.zeros(40, 8, dtype=torch.float32).scatter(
        1, out.topk_idx, out.topk_scores.float()
    )
    assert torch.allclose(dense, scores, rtol=1e-6, atol=1e-7)
    assert torch.allclose(out.importance.double(), imp.double(), rtol=1e-6)
    assert torch.allclose(out.load.double(), load, rtol=1e-6)
    assert abs(out.balance_loss.item() - loss.item()) <= 1e-6 * abs(loss.item())
    # gradients of (scores . r + balance loss) w.r.t. x and every gate weight
    r = torch.randn(40, 8, dtype=torch.float64)
    ours = (
        torch.zeros(40, 8, dtype=torch.float64).scatter(1, out.topk_idx, out.topk_scores.double())
        * r
    ).sum() + out.balance_loss
    theirs = (scores.double() * r).sum() + loss
    params = [x] + list(gate.parameters())
    g1 = torch.autograd.grad(ours, params)
    g2 = torch.autograd.grad(theirs, params)
    for a, b in zip(g1, g2):
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, err


def test_rules_differ_and_default_is_shazeer():
    assert MoEConfig().gate_load_rule == "shazeer"
    torch.manual_seed(0)
    x, noise = torch.randn(64, 16), torch.randn(64, 8)
    loads = {}
    for rule in ("shazeer", "published"):
        torch.manual_seed(1)
        gate = TopKBalancedNoisyGate(
            16, MoEConfig(num_experts=8, num_selects=2, gate_load_rule=rule)
        ).train()
        with torch.no_grad():
            gate.weight_noise.weight.normal_(0, 0.5)
        loads[rule] = gate(x, noise=noise).load
    assert not torch.allclose(loads["shazeer"], loads["published"])


def test_eval_and_k_equals_e_use_counts():
    torch.manual_seed(2)
    gate = TopKBalancedNoisyGate(16, MoEConfig(num_experts=4, num_selects=2)).eval()
    out = gate(torch.randn(30, 16))
    assert torch.equal(out.load, torch.bincount(out.topk_idx.flatten(), minlength=4).float())
    assert out.load.sum().item() == 60


def test_cv_squared():
    x = torch.rand(7) + 0.1
    assert abs(cv_squared(x).item() - ref_cv2(x).item()) < 1e-6
    assert cv_squared(torch.ones(1)).item() == 0.0


def test_switch_gate_matches_formulas():
    torch.manual_seed(3)
    cfg = MoEConfig(
        num_experts=4, num_selects=1, gate_type="SwitchBalancedGate", gate_network="mlp"
    )
    gate = SwitchBalancedGate(16, cfg).double().train()
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(50, 4, dtype=torch.float64)
    out = gate(x, noise=noise)
    probs = torch.softmax(gate.gate_network(x) + noise, 1)
    idx = probs.argmax(1)
    assert torch.equal(out.topk_idx[:, 0], idx)
    f = torch.bincount(idx, minlength=4).double() / 50
    p = probs.mean(0)
    ref = cfg.gate_balance_loss_weight * 4 * (f * p).sum()
    assert abs(out.balance_loss.item() - ref.item()) < 1e-9
    g1 = torch.autograd.grad(out.balance_loss, x)[0]
    g2 = torch.autograd.grad(ref, x)[0]
    assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-12)


def test_switch_capacity_drops_tokens():
    cfg = MoEConfig(
        num_experts=4,
        num_selects=1,
        gate_type="SwitchBalancedGate",
        drop_tokens=True,
        capacity_factor=1.0,
    )
    gate = SwitchBalancedGate(8, cfg).eval()
    with torch.no_grad():
        gate.gate_network[0].weight.zero_()
        gate.gate_network[2].weight.zero_()
        gate.gate_network[2].weight[0, 0] = 0  # all logits equal: everything goes to expert 0
    out = gate(torch.randn(20, 8))
    capacity = 20 // 4
    assert (out.topk_scores > 0).sum().item() == capacity
