"""LoRA: a real run trains only the adapters (and the MoE gates); merging is exact, in the
model and in the Hugging Face export."""

import json
import os

import pytest
import torch

from tests.train import fixtures as F


def _load(ckpt, lora_on=True):
    """(model, meta) of a checkpoint, with its LoRA adapters when it has them."""
    from megamoe import checkpoint
    from megamoe.model import lora
    from megamoe.model.llama import build_model

    meta = checkpoint.read_meta(ckpt)
    m, moe = checkpoint.configs_from_meta(meta)
    model = build_model(m, moe)
    if meta.get("lora") and lora_on:
        lora.apply_lora(model, lora.LoRASpec(**meta["lora"]))
    checkpoint.load_model(ckpt, model)
    return model.eval(), meta


@pytest.fixture(scope="module")
def lora_run(tiny):
    out = os.path.join(tiny.root, "run-lora")
    argv = F.train_argv(
        tiny.moe,
        tiny.data,
        None,
        out,
        training_mode="lora",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        max_steps=4,
        save_steps=4,
        eval_steps=0,
        learning_rate=1e-2,
        gradient_checkpointing=True,
    )  # frozen embeddings + recomputation
    r = F.run_train(argv)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "LoRA: rank 4, alpha 8, dropout 0 on q,k,v,o,gate,up,down + gates" in r.stdout
    return os.path.join(out, "checkpoint-4")


def test_lora_run_trains_only_adapters_and_gates(tiny, lora_run):
    from megamoe import parallel
    from megamoe.checkpoint import gather_full_state

    F.world1()
    pre = gather_full_state(_load(tiny.moe)[0])
    model, meta = _load(lora_run)
    assert meta["lora"]["rank"] == 4 and meta["lora"]["targets"] == list("qkvo") + [
        "gate",
        "up",
        "down",
    ]
    after = gather_full_state(model)
    adapters = [k for k in after if ".lora_" in k or "lora_" in k.split(".")[-2]]
    assert adapters and set(after) - set(adapters) == set(pre)
    for k, v in pre.items():
        if ".mlp.gate." in k:
            assert not torch.equal(v, after[k]), f"gate {k} did not train"
        else:
            assert torch.equal(v, after[k]), f"frozen {k} changed"
    bs = [k for k in adapters if "_B" in k]
    assert bs and all(after[k].abs().max() > 0 for k in bs)  # B starts at 0 and trained
    parallel.destroy()


def test_merge_is_exact_in_model_and_hf_export(tiny, lora_run, tmp_path):
    from safetensors.torch import load_file

    from megamoe import parallel
    from megamoe.convert import megamoe_to_hf
    from megamoe.model import lora
    from megamoe.model.llama import lm_inputs

    F.world1()
    model, meta = _load(lora_run)
    s = meta["lora"]["alpha"] / meta["lora"]["rank"]
    tokens = torch.randint(0, F.VOCAB, (2, F.SEQ), generator=torch.Generator().manual_seed(0))
    pos, _, _ = lm_inputs(tokens)
    with torch.no_grad():
        y_lora = model(tokens, pos, None)
    layer = model.decoder.layers[0]
    ex = layer.mlp.experts
    want_gate0 = (
        ex.weight_gate[: ex.sizes[0]] + s * ex.lora_gate_B[: ex.sizes[0]] @ ex.lora_gate_A[:4]
    )
    want_down1 = (
        ex.weight_down[:, ex.sizes[0] : sum(ex.sizes[:2])]
        + s * ex.lora_down_B[:, 4:8] @ ex.lora_down_A[:, ex.sizes[0] : sum(ex.sizes[:2])]
    )
    proj = layer.self_attention.linear_proj
    want_o = proj.weight + s * proj.lora_B @ proj.lora_A
    assert lora.merge_lora(model) == 3 * 2  # qkv, o, experts in 2 layers
    assert not [n for n, _ in model.named_parameters() if "lora" in n]
    with torch.no_grad():
        y_merged = model(tokens, pos, None)
    rel = ((y_merged - y_lora).norm() / y_lora.norm()).item()
    assert rel < 1e-6, rel
    parallel.destroy()

    out = megamoe_to_hf(lora_run, str(tmp_path / "hf"), progress=False)  # merges the adapters
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llama_moe" and cfg["num_experts"] == 4
    hf = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            hf.update(load_file(os.path.join(out, f)))
    p = "model.layers.0."
    torch.testing.assert_close(
        hf[p + "mlp.calculator.experts.weight_gate.0"], want_gate0.detach(), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        hf[p + "mlp.calculator.experts.weight_down.1"], want_down1.detach(), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        hf[p + "self_attn.o_proj.weight"], want_o.detach(), rtol=1e-6, atol=1e-7
    )
    assert not [k for k in hf if "lora" in k]
    assert not os.path.exists(str(tmp_path / "hf") + ".merged-megamoe")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_adapters_start_neutral_and_merge_exactly(moe):
    """Every target, random adapters: B = 0 leaves the model unchanged; merging reproduces the
    adapted model's logits."""
    from megamoe import parallel
    from megamoe.model import lora
    from megamoe.model.llama import build_model, lm_inputs

    F.world1(seed=3)
    m, e = F.tiny_configs(moe)
    if e is not None:
        e.gate_add_noise = False
    model = build_model(m, e).eval()
    tokens = torch.randint(0, F.VOCAB, (2, F.SEQ), generator=torch.Generator().manual_seed(1))
    pos, _, _ = lm_inputs(tokens)
    with torch.no_grad():
        y0 = model(tokens, pos, None)
        info = lora.apply_lora(model, lora.LoRASpec(rank=4, alpha=16, dropout=0.1))
        assert info["trainable"] < info["total"] / 2
        assert torch.equal(model(tokens, pos, None), y0)  # B = 0
        for n, p in model.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.1)
        y1 = model(tokens, pos, None)
        assert (y1 - y0).abs().max() > 1e-2
        lora.merge_lora(model)
        y2 = model(tokens, pos, None)
    # fp32: W + s B A rounds once where the adapted path rounds twice; measured 2e-7 .. 1.04e-6
    # over runs (the reduction order of the 2-core matmuls varies), so a few ulp of headroom
    assert ((y2 - y1).norm() / y1.norm()).item() < 4e-6
    parallel.destroy()
