"""The converter streams (formats/mcore_stream.py): the files it writes are those checkpoint.save
writes for the same tensors, its reader gives what checkpoint.load_model loads, bit for bit, and
a conversion's memory stays at a few layers where the whole-model path needed the model twice."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megamoe import checkpoint
from megamoe.config import MoEConfig
from megamoe.convert import _load_stream, _sliced, _with_gates, main
from megamoe.formats import mcore_stream
from megamoe.formats.hf_llama import hf_to_megamoe
from megamoe.model.llama import build_model
from megamoe.moefy import io as split_io
from tests.convert.conftest import M, load_checkpoint, params

REPO = Path(__file__).resolve().parents[2]
MODELS = {
    "dense": None,
    "mlp-unequal": MoEConfig(
        num_experts=4, num_selects=2, size_experts=[[10, 30, 20, 36], [24, 24, 24, 24]]
    ),
    "switch-linear": MoEConfig(
        num_experts=2, num_selects=1, gate_type="SwitchBalancedGate", gate_network="linear"
    ),
}


def _layout(model):
    """Every checkpoint entry of a model's sharded state dict, data left out."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megamoe.parallel.mcore import ShardedObject, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    out = []
    for sh in nested_values(sd):
        if isinstance(sh, ShardedObject):
            out.append(("object", sh.unique_key, sh.data))
        else:
            out.append(
                (
                    sh.key,
                    sh.dtype,
                    sh.local_shape,
                    sh.global_shape,
                    sh.global_offset,
                    sh.axis_fragmentations,
                    sh.replica_id,
                    sh.prepend_axis_num,
                    sh.flattened_range,
                )
            )
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_model_has_the_layout_of_build_model(world1, name):
    moe = MODELS[name]
    for dtype in (torch.float32, torch.bfloat16):
        meta = mcore_stream.meta_model(M, moe, dtype)
        real = build_model(M, moe, dtype=dtype)
        assert all(p.is_meta for p in meta.parameters())
        assert [(n, p.shape, p.dtype) for n, p in meta.named_parameters()] == [
            (n, p.shape, p.dtype) for n, p in real.named_parameters()
        ]
        assert _layout(meta) == _layout(real)


def _random_model(moe, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = build_model(M, moe, dtype=dtype)
    with torch.no_grad():  # every tensor random, zero-initialised gates included
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def _same_files(a: Path, b: Path):
    """The two model/ directories describe the same tensors, shards and objects."""
    a, b = a / "model", b / "model"
    ma, mb = (FileSystemReader(str(d)).read_metadata().state_dict_metadata for d in (a, b))
    assert ma.keys() == mb.keys()
    for k in ma:
        assert repr(ma[k]) == repr(mb[k]), k  # sizes, dtype, chunks (offsets and sizes)
    assert (a / "metadata.json").read_text() == (b / "metadata.json").read_text()
    assert torch.load(a / "common.pt") == torch.load(b / "common.pt")


@pytest.mark.parametrize(
    "name,dtype",
    [(n, torch.float32) for n in MODELS] + [("mlp-unequal", torch.bfloat16)],
    ids=lambda v: str(v).split(".")[-1],
)
def test_streaming_save_writes_what_checkpoint_save_writes(world1, tmp_path, name, dtype):
    moe = MODELS[name]
    model = _random_model(moe, dtype)
    meta = checkpoint.make_meta(M, moe)
    checkpoint.save(tmp_path / "saved", model, meta)
    streamed = tmp_path / "streamed"
    mcore_stream.save_streaming(
        mcore_stream.meta_model(M, moe, dtype),
        streamed / "model",
        ((n, p.detach().clone()) for n, p in model.named_parameters()),
    )
    (streamed / checkpoint.META).write_text(json.dumps(meta))
    assert sorted(os.listdir(streamed / "model")) == [
        ".metadata",
        "__0_0.distcp",
        "common.pt",
        "metadata.json",
    ]
    _same_files(tmp_path / "saved", streamed)

    want = params(model)
    for ck in ("saved", "streamed"):  # loaded into a world-1 model of the checkpoint's dtype
        loaded = build_model(M, moe, dtype=dtype)
        checkpoint.load_model(tmp_path / ck, loaded)
        got = params(loaded)
        assert all(torch.equal(got[k], want[k]) for k in want), ck

    # the reader: a layer at a time, fp32 as load_model into the default build_model
    full = build_model(M, moe)
    checkpoint.load_model(streamed, full)
    reader = mcore_stream.CheckpointReader(mcore_stream.meta_model(M, moe), streamed)
    assert reader.missing_keys() == []
    for n, p in full.named_parameters():
        assert torch.equal(reader.get(n), p.detach()), n


def test_stream_errors(world1, tmp_path):
    model = _random_model(None)
    items = [(n, p.detach()) for n, p in model.named_parameters()]
    meta = mcore_stream.meta_model(M)
    cases = [
        (items[:-1], "output_layer.weight was not produced"),
        (items + items[-1:], "produced twice"),
        (items + [("decoder.layers.9.mlp.x", items[0][1])], "no parameter"),
        ([(items[0][0], items[0][1][:3])] + items[1:], "does not fit the model"),
    ]
    for i, (stream, match) in enumerate(cases):
        with pytest.raises(mcore_stream.StreamError, match=match):
            mcore_stream.save_streaming(meta, tmp_path / str(i), iter(stream))


def test_convert_equals_the_whole_model_path(world1, tmp_path, hf_model, hf_dir):
    """hf-to-megamoe (dense -> MoE, bf16) streams into the files that filling build_model with
    the same tensors and checkpoint.save would write."""
    out = tmp_path / "moe"
    assert (
        main(
            [
                "hf-to-megamoe",
                "--hf-dir",
                str(hf_dir),
                "--output",
                str(out),
                "--model-type",
                "llama_moe",
                "--num-experts",
                "4",
                "--num-selects",
                "2",
                "--expert-sizes",
                "16,32,24,24",
                "--split-seed",
                "3",
                "--dtype",
                "bfloat16",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = checkpoint.read_meta(out)
    _, moe = checkpoint.configs_from_meta(meta)
    splits, _ = split_io.read_splits(
        out / split_io.SPLIT_DIR, M.num_hidden_layers, M.intermediate_size, 4
    )
    sd = hf_model.state_dict()
    ref = build_model(M, moe, dtype=torch.bfloat16)
    _load_stream(
        ref, _with_gates(_sliced(hf_to_megamoe(sd.__getitem__, M), splits), M.hidden_size, moe, 3)
    )
    checkpoint.save(tmp_path / "ref", ref, meta)
    _same_files(tmp_path / "ref", out)
    got, want = params(load_checkpoint(out)[0]), params(load_checkpoint(tmp_path / "ref")[0])
    assert all(torch.equal(got[k], want[k]) for k in want)


# --------------------------------------------------------------------------------------------
# memory


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _growth(args) -> int:
    """Peak growth of anonymous memory of a conversion in a fresh process (memory_worker.py)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    # glibc keeps freed blocks of up to 32 MB in its heap (a dynamic mmap threshold); a fixed
    # threshold returns them at once, so the growth measures live tensors, not the allocator
    env.update(MASTER_PORT=str(_free_port()), MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run(
        [sys.executable, "-m", "tests.convert.memory_worker", *args, "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    return report["growth"]


def test_memory_stays_at_a_few_layers(tmp_path):
    """16 layers of 25 MB (fp32), 415 MB in all. Measured: the streaming converter grows by
    ~65 MB (hf-to-megamoe) and ~80 MB (megamoe-to-hf, 50 MB output shards); the whole-model path
    it replaces grew by ~730 MB and ~450 MB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(cfg)
    total = sum(p.numel() * 4 for p in hf.parameters())
    layer = sum(p.numel() * 4 for p in hf.model.layers[0].parameters())
    assert total > 400e6 and 20e6 < layer < 30e6
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100MB")
    del hf

    grown = _growth(
        [
            "hf-to-megamoe",
            "--hf-dir",
            str(tmp_path / "hf"),
            "--output",
            str(tmp_path / "moe"),
            "--model-type",
            "llama_moe",
            "--num-experts",
            "8",
            "--num-selects",
            "2",
        ]
    )
    assert grown < 5 * layer, f"hf-to-megamoe grew by {grown / 1e6:.0f} MB of {total / 1e6:.0f}"
    grown = _growth(
        [
            "megamoe-to-hf",
            "--checkpoint",
            str(tmp_path / "moe"),
            "--output",
            str(tmp_path / "out"),
            "--max-shard-size",
            "50MB",
        ]
    )
    assert grown < 5 * layer, f"megamoe-to-hf grew by {grown / 1e6:.0f} MB of {total / 1e6:.0f}"
