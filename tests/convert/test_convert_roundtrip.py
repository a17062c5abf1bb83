"""megamoe -> HF LLaMA-MoE -> megamoe, bit-exact: unequal expert sizes, per-layer scale factors,
mlp and linear gates; the HF side checked against the released LLaMA-MoE config fields."""

import json

import pytest
import torch
from safetensors import safe_open

from megamoe import checkpoint
from megamoe.config import MoEConfig
from megamoe.convert import main
from megamoe.model.llama import build_model
from tests.convert.conftest import M, load_checkpoint, logits_of, params

CASES = {
    "mlp-unequal-per-layer-sf": MoEConfig(
        num_experts=4,
        num_selects=2,
        size_experts=[[10, 30, 24, 32], [24, 24, 40, 8]],
        score_scale_factor=[2.5, 3.0],
    ),
    "linear-equal-sf": MoEConfig(
        num_experts=8,
        num_selects=2,
        gate_network="linear",
        score_scale_factor=6.0,
        gate_balance_loss_weight=0.05,
    ),
    "switch-top1": MoEConfig(
        num_experts=2,
        num_selects=1,
        gate_type="SwitchBalancedGate",
        drop_tokens=True,
        capacity_factor=1.5,
    ),
}


def _random_megamoe(path, moe, seed=0):
    torch.manual_seed(seed)
    model = build_model(M, moe).eval()
    with torch.no_grad():  # every tensor random, gates included (zero-initialised ones too)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    checkpoint.save(path, model, checkpoint.make_meta(M, moe, step=7))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_moe_round_trip_bit_exact(world1, tmp_path, case):
    moe = CASES[case]
    ck = tmp_path / "ck"
    orig = params(_random_megamoe(ck, moe))
    hf = tmp_path / "hf"
    assert (
        main(
            [
                "megamoe-to-hf",
                "--checkpoint",
                str(ck),
                "--output",
                str(hf),
                "--max-shard-size",
                "60KB",
                "--no-progress",
            ]
        )
        == 0
    )
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "llama_moe" and cfg["architectures"] == ["LlamaMoEForCausalLM"]
    assert cfg["num_experts"] == moe.num_experts and cfg["num_selects"] == moe.num_selects
    assert cfg["size_experts"] == moe.size_experts
    assert cfg["score_scale_factor"] == (
        moe.score_scale_factor or moe.num_experts / moe.num_selects
    )
    assert cfg["gate_network"] == moe.gate_network and cfg["gate_type"] == moe.gate_type
    # HF tensor names and shapes of section 3
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for f in set(index.values()):
        with safe_open(str(hf / f), framework="pt") as h:
            shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    d, e = M.hidden_size, moe.num_experts
    for i in range(M.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        if moe.gate_network == "mlp":
            assert shapes[p + "gate.gate_network.0.weight"] == (e, d)
            assert shapes[p + "gate.gate_network.2.weight"] == (e, e)
        else:
            assert shapes[p + "gate.gate_network.weight"] == (e, d)
        assert (p + "gate.weight_noise.weight" in shapes) == (
            moe.gate_type == "TopKBalancedNoisyGate"
        )
        for j, s in enumerate(moe.expert_sizes(i, M.intermediate_size)):
            assert shapes[f"{p}calculator.experts.weight_gate.{j}"] == (s, d)
            assert shapes[f"{p}calculator.experts.weight_up.{j}"] == (s, d)
            assert shapes[f"{p}calculator.experts.weight_down.{j}"] == (d, s)
        assert not any(k.startswith(p) and "proj" in k for k in shapes)
    # ... and back
    back = tmp_path / "back"
    assert main(["hf-to-megamoe", "--hf-dir", str(hf), "--output", str(back), "--no-progress"]) == 0
    model, meta = load_checkpoint(back)
    want = moe
    if moe.score_scale_factor is None:  # HF configs always state it (E / K)
        want = MoEConfig(
            **{**moe.__dict__, "score_scale_factor": moe.num_experts / moe.num_selects}
        )
    assert MoEConfig(**meta["moe"]) == want
    got = params(model)
    assert got.keys() == orig.keys()
    assert all(torch.equal(got[k], orig[k]) for k in orig), [
        k for k in orig if not torch.equal(got[k], orig[k])
    ]


def test_hf_llama_moe_flags_override(world1, tmp_path):
    """An HF LLaMA-MoE directory continues training with --score-scale-factor / --num-selects
    overriding its config; the weights are unchanged."""
    moe = CASES["mlp-unequal-per-layer-sf"]
    ck = tmp_path / "ck"
    orig = _random_megamoe(ck, moe, seed=1)
    hf = tmp_path / "hf"
    assert (
        main(["megamoe-to-hf", "--checkpoint", str(ck), "--output", str(hf), "--no-progress"]) == 0
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "hf-to-megamoe",
                "--hf-dir",
                str(hf),
                "--output",
                str(out),
                "--model-type",
                "llama_moe",
                "--num-selects",
                "3",
                "--score-scale-factor",
                "1.5,2.0",
                "--expert-model-parallel-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    model, meta = load_checkpoint(out)
    assert meta["moe"]["num_selects"] == 3 and meta["moe"]["score_scale_factor"] == [1.5, 2.0]
    assert meta["source_model_type"] == "llama_moe"
    a, b = params(orig), params(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the scale factor reaches the layer: SF 1.5 vs 2.5 changes layer 0's output
    assert model.decoder.layers[0].mlp.scale == 1.5


def test_moe_export_is_the_split_model(world1, tmp_path, hf_dir, hf_model):
    """dense HF -> llama_moe (identity setting) -> HF LLaMA-MoE: the exported experts are the
    dense rows/columns of the split file, and re-importing keeps the dense logits."""
    ck = tmp_path / "ck"
    assert (
        main(
            [
                "hf-to-megamoe",
                "--hf-dir",
                str(hf_dir),
                "--output",
                str(ck),
                "--model-type",
                "llama_moe",
                "--num-experts",
                "4",
                "--num-selects",
                "4",
                "--gate-network",
                "linear",
                "--score-scale-factor",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    hf = tmp_path / "hf"
    assert (
        main(
            [
                "megamoe-to-hf",
                "--checkpoint",
                str(ck),
                "--output",
                str(hf),
                "--dtype",
                "float32",
                "--no-progress",
            ]
        )
        == 0
    )
    split = json.loads((ck / "split" / "layer_1.json").read_text())["experts"]
    with safe_open(str(hf / "model.safetensors"), framework="pt") as h:
        for j, ids in enumerate(split):
            w = h.get_tensor(f"model.layers.1.mlp.calculator.experts.weight_up.{j}")
            assert torch.equal(w, hf_model.state_dict()["model.layers.1.mlp.up_proj.weight"][ids])
    back = tmp_path / "back"
    assert main(["hf-to-megamoe", "--hf-dir", str(hf), "--output", str(back), "--no-progress"]) == 0
    tokens = torch.randint(0, M.vocab_size, (1, 12))
    a = logits_of(load_checkpoint(ck)[0], tokens)
    assert torch.equal(a, logits_of(load_checkpoint(back)[0], tokens))


def test_remote_code_auto_map(world1, tmp_path):
    ck = tmp_path / "ck"
    _random_megamoe(ck, CASES["linear-equal-sf"])
    code = tmp_path / "code"
    code.mkdir()
    (code / "configuration_llama_moe.py").write_text("class LlamaMoEConfig:\n    pass\n")
    (code / "modeling_llama_moe_hf.py").write_text(
        "class LlamaMoEModel:\n    pass\n\n\nclass LlamaMoEForCausalLM:\n    pass\n"
    )
    hf = tmp_path / "hf"
    assert (
        main(
            [
                "megamoe-to-hf",
                "--checkpoint",
                str(ck),
                "--output",
                str(hf),
                "--remote-code",
                str(code),
                "--dtype",
                "bfloat16",
                "--no-progress",
            ]
        )
        == 0
    )
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_llama_moe.LlamaMoEConfig",
        "AutoModel": "modeling_llama_moe_hf.LlamaMoEModel",
        "AutoModelForCausalLM": "modeling_llama_moe_hf.LlamaMoEForCausalLM",
    }
    assert (hf / "modeling_llama_moe_hf.py").is_file() and cfg["torch_dtype"] == "bfloat16"
    with safe_open(str(hf / "model.safetensors"), framework="pt") as h:
        assert h.get_tensor("lm_head.weight").dtype == torch.bfloat16
