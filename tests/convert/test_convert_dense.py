"""Dense LLaMA: transformers -> megamoe -> transformers, through the command line and real files."""

import json

import pytest
import torch

from megamoe.convert import main
from tests.convert.conftest import M, load_checkpoint, logits_of, params, save_bin
from tests.helpers import rel_err


@pytest.mark.parametrize("source", ["safetensors", "bin-sharded"])
def test_hf_llama_to_megamoe_matches_transformers(world1, tmp_path, hf_model, hf_dir, source):
    src = hf_dir
    if source == "bin-sharded":
        src = tmp_path / "hf_bin"
        save_bin(hf_model.state_dict(), src, shards=3)
        (src / "config.json").write_text((hf_dir / "config.json").read_text())
    out = tmp_path / "dense"
    assert (
        main(
            [
                "hf-to-megamoe",
                "--hf-dir",
                str(src),
                "--output",
                str(out),
                "--no-progress",
                "--tensor-model-parallel-size",
                "2",
                "--pipeline-model-parallel-size",
                "2",
            ]
        )
        == 0
    )
    model, meta = load_checkpoint(out)
    assert meta["model_type"] == "llama" and meta["moe"] is None
    assert meta["model"] == M.__dict__
    tokens = torch.randint(0, M.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(tokens).logits
    err = rel_err(logits_of(model, tokens), ref)
    print(f"dense {source} -> megamoe vs transformers: rel err {err:.2e}")
    assert err < 1e-5


def test_megamoe_to_hf_llama_round_trip(world1, tmp_path, hf_model, hf_dir):
    """megamoe -> HF (sharded, with tokenizer) loads in transformers with bit-equal weights; and
    HF -> megamoe -> HF -> megamoe is bit-exact."""
    from transformers import LlamaForCausalLM

    ck = tmp_path / "dense"
    assert (
        main(["hf-to-megamoe", "--hf-dir", str(hf_dir), "--output", str(ck), "--no-progress"]) == 0
    )
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"\x00sentencepiece-bytes")
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "model.safetensors").write_bytes(b"not a tokenizer file")  # must not be copied
    out = tmp_path / "hf_out"
    assert (
        main(
            [
                "megamoe-to-hf",
                "--checkpoint",
                str(ck),
                "--output",
                str(out),
                "--format",
                "llama",
                "--tokenizer",
                str(tok),
                "--max-shard-size",
                "50KB",
                "--no-progress",
            ]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert {"tokenizer.model", "tokenizer_config.json", "config.json"} <= set(names)
    assert (out / "tokenizer.model").read_bytes() == b"\x00sentencepiece-bytes"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    ref = hf_model.state_dict()
    for k, t in loaded.state_dict().items():
        assert torch.equal(t, ref[k]), k
    tokens = torch.randint(0, M.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, hf_model(tokens).logits)
    # and back: bit-exact megamoe parameters
    ck2 = tmp_path / "dense2"
    assert main(["hf-to-megamoe", "--hf-dir", str(out), "--output", str(ck2), "--no-progress"]) == 0
    a, b = params(load_checkpoint(ck)[0]), params(load_checkpoint(ck2)[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_are_copied(world1, tmp_path, hf_model):
    from safetensors.torch import save_file

    sd = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    d = tmp_path / "tied"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    cfg = json.loads(hf_model.config.to_json_string())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ck"
    assert main(["hf-to-megamoe", "--hf-dir", str(d), "--output", str(out), "--no-progress"]) == 0
    p = params(load_checkpoint(out)[0])
    assert torch.equal(p["output_layer.weight"], sd["model.embed_tokens.weight"])


def test_bf16_checkpoint(world1, tmp_path, hf_dir):
    out = tmp_path / "bf16"
    assert (
        main(
            [
                "hf-to-megamoe",
                "--hf-dir",
                str(hf_dir),
                "--output",
                str(out),
                "--dtype",
                "bfloat16",
                "--no-progress",
            ]
        )
        == 0
    )
    from megamoe.formats.hf_files import HFWeights

    model, _ = load_checkpoint(out)  # fp32 model loads the bf16 checkpoint (exact upcast)
    emb = model.embedding.word_embeddings.weight
    src = HFWeights(hf_dir).get("model.embed_tokens.weight")
    assert torch.equal(emb, src.to(torch.bfloat16).float())
