"""The model against real references: transformers' LLaMA, and the split identity."""

import pytest
import torch

from megamoe.config import MoEConfig
from megamoe.formats.hf_llama import hf_to_megamoe
from megamoe.model.llama import build_model
from megamoe.moefy.split import random_split, slice_ffn
from tests.helpers import hf_llama, rel_err, tiny_model_config


def load_full(model, named):
    missing, unexpected = model.load_state_dict(dict(named), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)


def dense_from_hf(hf, m):
    sd = hf.state_dict()
    model = build_model(m).eval()
    load_full(model, hf_to_megamoe(sd.__getitem__, m))
    return model


def logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_dense_matches_transformers(world1, kv_heads):
    m = tiny_model_config(num_key_value_heads=kv_heads)
    hf = hf_llama(m, seed=kv_heads)
    model = dense_from_hf(hf, m)
    tokens = torch.randint(0, m.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(tokens).logits
    err = rel_err(logits(model, tokens), ref)
    print(f"dense vs transformers: rel err {err:.2e}")
    assert err < 1e-5


def moe_from_dense(hf, m, moe, seed=0):
    sd = hf.state_dict()
    moe_sd = dict(hf_to_megamoe(sd.__getitem__, m))  # dense names, then replace the FFNs
    model = build_model(m, moe).eval()
    for i in range(m.num_hidden_layers):
        p = f"decoder.layers.{i}.mlp."
        gate, up = moe_sd.pop(p + "linear_fc1.weight").chunk(2, 0)
        down = moe_sd.pop(p + "linear_fc2.weight")
        split = random_split(m.intermediate_size, moe.num_experts, seed + i)
        wg, wu, wd = slice_ffn(gate, up, down, split)
        moe_sd[p + "experts.weight_gate"], moe_sd[p + "experts.weight_up"] = wg, wu
        moe_sd[p + "experts.weight_down"] = wd
        for name, t in model.state_dict().items():
            if name.startswith(p + "gate."):
                moe_sd[name] = torch.zeros_like(t)
    load_full(model, moe_sd.items())
    return model


@pytest.mark.parametrize("num_experts", [4, 8])
def test_split_identity(world1, num_experts):
    """Linear zero gate, K = E, SF = E: the MoE model computes the dense model exactly."""
    m = tiny_model_config()
    hf = hf_llama(m, seed=3)
    moe = MoEConfig(
        num_experts=num_experts,
        num_selects=num_experts,
        gate_network="linear",
        score_scale_factor=float(num_experts),
    )
    tokens = torch.randint(0, m.vocab_size, (2, 16))
    dense = logits(dense_from_hf(hf, m), tokens)
    moe_logits = logits(moe_from_dense(hf, m, moe), tokens)
    err = rel_err(moe_logits, dense)
    print(f"split identity E={num_experts}: rel err {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_pinned_attention_kernel_equals_torchs_choice(world1, kv_heads):
    """--attention_backend math (the plain kernel) gives torch's own choice's logits and
    gradients on fresh random weights and tokens; a GPU kernel's name or an unknown one is
    refused where it cannot run."""
    m = tiny_model_config(num_key_value_heads=kv_heads)
    models = {}
    for backend in ("auto", "math"):
        torch.manual_seed(kv_heads)
        models[backend] = build_model(
            m, MoEConfig(num_experts=4, num_selects=2), attention_backend=backend
        ).eval()  # no dropout, no gate noise: the two runs see the same randomness
    models["math"].load_state_dict(models["auto"].state_dict())
    tokens = torch.randint(0, m.vocab_size, (2, 24))
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    outs, grads = {}, {}
    for backend, model in models.items():
        out = model(tokens, pos, None)
        (out.float().square().mean()).backward()
        outs[backend] = out.detach()
        grads[backend] = torch.cat(
            [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        )
    assert outs["auto"].abs().max() > 0 and grads["auto"].abs().max() > 0
    fwd, bwd = rel_err(outs["math"], outs["auto"]), rel_err(grads["math"], grads["auto"])
    print(f"math vs auto attention: logits rel err {fwd:.2e}, gradients {bwd:.2e}")
    assert fwd < 1e-5 and bwd < 1e-5
    from megamoe.config import ATTENTION_BACKENDS
    from megamoe.model.llama import SDPA_BACKENDS

    assert set(ATTENTION_BACKENDS) == {"auto", *SDPA_BACKENDS}  # the flag's choices all work
    with pytest.raises(ValueError, match="attention backend 'fast'"):
        build_model(m, attention_backend="fast")
