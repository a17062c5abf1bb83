"""HF file formats against the real libraries: transformers writes, we read; we write,
transformers and safetensors read."""

import json

import pytest
import torch
from safetensors import safe_open

from megamoe.config import MoEConfig
from megamoe.formats import hf_config as hfc
from megamoe.formats.hf_config import HFFormatError
from megamoe.formats.hf_files import HFWeights, ShardedSafetensorsWriter, parse_size
from tests.convert.conftest import M, save_bin


def _check_reads_all(d, sd, kind):
    w = HFWeights(d)
    assert w.kind == kind
    assert sorted(w.names()) == sorted(sd)
    for k, t in sd.items():
        assert torch.equal(w.get(k), t), k
    assert w.unread() == []


def test_reads_safetensors_single_and_sharded(tmp_path, hf_model):
    sd = hf_model.state_dict()
    hf_model.save_pretrained(tmp_path / "single")
    _check_reads_all(tmp_path / "single", sd, "safetensors")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _check_reads_all(tmp_path / "sharded", sd, "safetensors")


@pytest.mark.parametrize("shards", [1, 3])
def test_reads_bin_single_and_sharded(tmp_path, hf_model, shards):
    from transformers import LlamaForCausalLM

    sd = hf_model.state_dict()
    save_bin(sd, tmp_path, shards)
    _check_reads_all(tmp_path, sd, "bin")
    hf_model.config.save_pretrained(
        tmp_path
    )  # the files are the real format: transformers reads them
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(t, sd[k]) for k, t in loaded.state_dict().items())


def test_unread_reports_unused_tensors(tmp_path, hf_model):
    sd = dict(hf_model.state_dict())
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old buffer: ignored
    sd["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    save_bin(sd, tmp_path)
    w = HFWeights(tmp_path)
    for k in hf_model.state_dict():
        w.get(k)
    assert w.unread() == ["model.layers.0.mlp.extra.weight"]


@pytest.mark.parametrize(
    "text,n",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("1.5KB", 1500),
        (123, 123),
        ("77", 77),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["five", "5XB", "-1GB", "0"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="max-shard-size"):
        parse_size(bad)


def test_sharded_writer_loads_in_transformers(tmp_path, hf_model):
    """Our sharded safetensors + index + config.json is a directory transformers loads."""
    from transformers import LlamaForCausalLM

    sd = hf_model.state_dict()
    w = ShardedSafetensorsWriter(tmp_path, "30KB")
    w.add_all(sd.items())
    files = w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    for f in shards:  # each shard within the limit unless one tensor alone exceeds it
        with safe_open(str(tmp_path / f), framework="pt") as h:
            sizes = [h.get_tensor(k).numel() * 4 for k in h.keys()]
            assert sum(sizes) <= 30_000 or len(sizes) == 1
            assert h.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob("*.part"))
    hfc.write_config_json(tmp_path, hfc.llama_config_dict(M))
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for k, t in loaded.state_dict().items():
        assert torch.equal(t, sd[k]), k
    tokens = torch.randint(0, M.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, hf_model(tokens).logits)


def test_single_shard_writes_model_safetensors(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, "5GB")
    w.add("a", torch.ones(3))
    assert w.close() == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_llama_config_round_trip_through_transformers(tmp_path):
    """Our config.json read by transformers' LlamaConfig, and transformers' (5.x layout, with
    rope_parameters) read by us."""
    from transformers import LlamaConfig

    m = M.__class__(**{**M.__dict__, "rope_theta": 500000.0, "rms_norm_eps": 1e-5})
    hfc.write_config_json(tmp_path, hfc.llama_config_dict(m))
    cfg = LlamaConfig.from_pretrained(tmp_path)
    assert cfg.rope_parameters["rope_theta"] == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.num_key_value_heads == m.kv_heads and not cfg.tie_word_embeddings
    cfg.save_pretrained(tmp_path / "t5")
    raw = hfc.read_config_json(tmp_path / "t5")
    assert "rope_parameters" in raw
    assert hfc.model_config_from_hf(raw) == m


def test_llama_moe_config_fields():
    moe = MoEConfig(
        num_experts=4,
        num_selects=2,
        size_experts=[[20, 28, 24, 24], [24] * 4],
        score_scale_factor=[2.0, 3.5],
        gate_network="linear",
    )
    cfg = hfc.llama_moe_config_dict(M, moe, "bfloat16")
    assert cfg["model_type"] == "llama_moe" and cfg["architectures"] == ["LlamaMoEForCausalLM"]
    for k in (
        "num_experts",
        "num_selects",
        "size_experts",
        "gate_type",
        "gate_network",
        "gate_use_softmax",
        "gate_use_balance",
        "gate_balance_loss_weight",
        "gate_add_noise",
        "gate_noise_epsilon",
        "calculator_type",
        "multiply_gate_scores",
        "score_scale_factor",
        "add_weight_norm",
        "drop_tokens",
        "dropped_padding",
        "capacity_factor",
    ):
        assert k in cfg, k
    assert cfg["calculator_type"] == "UniversalCalculator" and cfg["torch_dtype"] == "bfloat16"
    assert cfg["size_experts"] == [[20, 28, 24, 24], [24] * 4]
    assert cfg["score_scale_factor"] == [2.0, 3.5]
    back = hfc.moe_config_from_hf(json.loads(json.dumps(cfg)), M)
    assert back == moe
    # equal sizes written as explicit lists (as released LLaMA-MoE configs do) read as None
    cfg["size_experts"] = [[24] * 4, [24] * 4]
    assert hfc.moe_config_from_hf(cfg, M).size_experts is None
    eq = hfc.llama_moe_config_dict(M, MoEConfig(num_experts=4, num_selects=1))
    assert eq["size_experts"] is None and eq["score_scale_factor"] == 4.0


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "mistral"}, "is not LLaMA"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "biases"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"num_attention_heads": 5}, "divisible"),
        ({"head_dim": 8}, "head_dim"),
    ],
)
def test_config_rejects(change, match):
    cfg = {**hfc.llama_config_dict(M), **change}
    with pytest.raises(HFFormatError, match=match):
        hfc.model_config_from_hf(cfg, "x/config.json")


def test_moe_config_rejects():
    cfg = hfc.llama_moe_config_dict(M, MoEConfig(num_experts=4, num_selects=2))
    with pytest.raises(HFFormatError, match="num_selects 5"):
        hfc.moe_config_from_hf({**cfg, "num_selects": 5}, M, "x/config.json")
    with pytest.raises(HFFormatError, match="not divisible"):
        hfc.moe_config_from_hf({**cfg, "num_experts": 5, "num_selects": 1}, M, "x/config.json")
    with pytest.raises(HFFormatError, match="size_experts"):
        hfc.moe_config_from_hf({**cfg, "size_experts": [[24] * 4]}, M, "x/config.json")
