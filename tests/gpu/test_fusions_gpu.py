"""The fused CUDA path (megamoe/model/fusion.py: compiled RMSNorm, rotary, SwiGLU, cross-entropy,
gate) against the plain one (MEGAMOE_COMPILE=0), and "auto" attention against an fp32 reference:
fresh random weights and tokens, forward and backward."""

import pytest
import torch

from tests.helpers import rel_err, tiny_model_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _loss_and_grads(model, tokens):
    from megamoe.model.llama import lm_inputs

    pos, labels, mask = lm_inputs(tokens)
    per_token = model(tokens, pos, None, labels=labels)
    loss = (per_token.float() * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return per_token.detach().float(), grads


@pytest.mark.parametrize(
    "dtype,tol,moe",
    [(torch.float32, 1e-5, True), (torch.float32, 1e-5, False), (torch.bfloat16, 2e-2, False)],
    ids=["fp32-llama_moe", "fp32-llama", "bf16-llama"],
)
def test_fused_step_matches_plain(world1, monkeypatch, dtype, tol, moe):
    """In bf16 a MoE model's routing flips on near-ties between the two paths (rounding), which
    moves gradients by far more than rounding: the MoE pieces are compared in fp32."""
    from megamoe.config import MoEConfig
    from megamoe.model.llama import build_model

    m = tiny_model_config(
        hidden_size=256, intermediate_size=1024, num_attention_heads=8, vocab_size=1000
    )
    moe_cfg = MoEConfig(num_experts=8, num_selects=2, gate_add_noise=False) if moe else None
    tokens = torch.randint(0, m.vocab_size, (2, 64), device="cuda")
    models, out = {}, {}
    for compiled in ("0", "1"):  # the fused model gets the plain one's weights
        monkeypatch.setenv("MEGAMOE_COMPILE", compiled)
        models[compiled] = build_model(m, moe_cfg, dtype=dtype)
        if compiled == "1":
            assert models["1"].config.apply_rope_fusion
            # megatron-core's fused cross-entropy returns bf16 gradients: bf16 models only
            assert models["1"].config.cross_entropy_loss_fusion == (dtype == torch.bfloat16)
            models["1"].load_state_dict(models["0"].state_dict())
        out[compiled] = _loss_and_grads(models[compiled], tokens)
    (loss0, g0), (loss1, g1) = out["0"], out["1"]
    assert loss0.abs().max() > 0 and g0.keys() == g1.keys()
    errs = {"loss": rel_err(loss1, loss0)} | {n: rel_err(g1[n], g0[n]) for n in g0}
    worst = max(errs, key=errs.get)
    print(f"fused vs plain ({dtype}): worst rel err {errs[worst]:.2e} ({worst})")
    assert errs[worst] < tol, (worst, errs[worst])


@pytest.mark.parametrize("kv_heads", [32, 8])
def test_auto_attention_matches_fp32_reference(kv_heads):
    """bf16 causal attention at LLaMA-MoE-3.5B head shapes: the kernel "auto" picks is as close
    to an fp32 reference as the flash kernel is, forward and backward; on Hopper it is cuDNN's."""
    from megamoe import parallel
    from megamoe.model.llama import SDPAttention, auto_attention_order, transformer_config

    torch.manual_seed(kv_heads)
    s, b, h, d = 1024, 2, 32, 128
    q = torch.randn(s, b, h, d, device="cuda")
    k, v = (torch.randn(s, b, kv_heads, d, device="cuda") for _ in range(2))
    dy = torch.randn(s, b, h * d, device="cuda")
    m = tiny_model_config(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=kv_heads)
    cfg = transformer_config(m, parallel.ParallelLayout())
    results = {}
    for backend in ("math", "flash", "auto"):  # math in fp32: the reference
        dtype = torch.float32 if backend == "math" else torch.bfloat16
        attn = SDPAttention(cfg, 1, None, backend=backend)
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        y = attn(*x)
        y.backward(dy.to(dtype))
        results[backend] = [y.detach()] + [t.grad for t in x]
    names = ("out", "dq", "dk", "dv")
    for backend in ("flash", "auto"):
        errs = [rel_err(a, r) for a, r in zip(results[backend], results["math"])]
        print(backend, kv_heads, " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)))
        assert max(errs) < 2e-2, (backend, errs)
    if auto_attention_order(q.device) and kv_heads == h:  # Hopper: auto is cuDNN's kernel
        attn = SDPAttention(cfg, 1, None, backend="cudnn")
        assert torch.equal(attn(*(t.bfloat16() for t in (q, k, v))), results["auto"][0])
