"""The split identity through the command line: dense HF LLaMA -> llama_moe with a linear (zero)
gate, K = E, SF = E computes exactly the dense model, for every split method."""

import json

import numpy as np
import pytest
import torch

from megamoe.convert import main
from megamoe.moefy import io as split_io
from tests.convert.conftest import M, load_checkpoint, logits_of, params
from tests.helpers import rel_err

TOKENS = torch.randint(0, M.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))


def _to_moe(hf_dir, out, e, *extra):
    argv = [
        "hf-to-megamoe",
        "--hf-dir",
        str(hf_dir),
        "--output",
        str(out),
        "--model-type",
        "llama_moe",
        "--num-experts",
        str(e),
        "--num-selects",
        str(e),
        "--gate-network",
        "linear",
        "--score-scale-factor",
        str(float(e)),
        "--no-progress",
        *extra,
    ]
    assert main(argv) == 0


def _dense_logits(hf_model):
    with torch.no_grad():
        return hf_model(TOKENS).logits


def _experts_partition(model, hf_model, splits):
    """Each expert's weights are exactly the dense rows/columns its split file lists."""
    sd, p = hf_model.state_dict(), params(model)
    for i, split in enumerate(splits):
        idx = torch.as_tensor(np.concatenate(split))
        mg = f"decoder.layers.{i}.mlp.experts."
        assert torch.equal(p[mg + "weight_gate"], sd[f"model.layers.{i}.mlp.gate_proj.weight"][idx])
        assert torch.equal(p[mg + "weight_up"], sd[f"model.layers.{i}.mlp.up_proj.weight"][idx])
        assert torch.equal(
            p[mg + "weight_down"], sd[f"model.layers.{i}.mlp.down_proj.weight"][:, idx]
        )


METHODS = [
    ("random", 4, []),
    ("clustering", 4, ["--split-metric", "l2"]),
    ("clustering", 3, ["--split-metric", "cosine", "--split-key", "gate"]),
    ("graph", 4, ["--split-samples", "12", "--split-seq-length", "16"]),
    (
        "gradient",
        4,
        ["--gradient-variant", "non-sharing", "--split-samples", "12", "--split-seq-length", "16"],
    ),
]


@pytest.mark.parametrize("method,e,extra", METHODS, ids=[f"{m}-E{e}" for m, e, _ in METHODS])
def test_split_identity(world1, tmp_path, hf_model, hf_dir, sample_data, method, e, extra):
    out = tmp_path / "moe"
    data = ["--split-data", sample_data] if method in ("graph", "gradient") else []
    _to_moe(hf_dir, out, e, "--split", method, "--split-seed", "5", *data, *extra)
    model, meta = load_checkpoint(out)
    assert meta["model_type"] == "llama_moe" and meta["split"] == method
    assert meta["split_seed"] == 5 and meta["moe"]["num_experts"] == e
    splits, infos = split_io.read_splits(out, M.num_hidden_layers, M.intermediate_size, e)
    assert infos[0]["method"] == method
    for s in splits:
        assert [len(x) for x in s] == [M.intermediate_size // e] * e
        assert np.array_equal(np.sort(np.concatenate(s)), np.arange(M.intermediate_size))
    _experts_partition(model, hf_model, splits)
    err = rel_err(logits_of(model, TOKENS), _dense_logits(hf_model))
    print(f"split identity {method} E={e}: rel err {err:.2e}")
    assert err < 1e-5


def test_split_identity_unequal_sizes_and_split_file_reuse(world1, tmp_path, hf_model, hf_dir):
    out = tmp_path / "moe"
    _to_moe(hf_dir, out, 3, "--split", "random", "--expert-sizes", "16,48,32")
    model, meta = load_checkpoint(out)
    assert meta["moe"]["size_experts"] == [[16, 48, 32]] * M.num_hidden_layers
    err = rel_err(logits_of(model, TOKENS), _dense_logits(hf_model))
    print(f"split identity random unequal sizes: rel err {err:.2e}")
    assert err < 1e-5
    # --split-file: the same experts again (another seed would give other ones)
    again = tmp_path / "again"
    _to_moe(hf_dir, again, 3, "--split-file", str(out), "--split-seed", "9")
    a, b = params(model), params(load_checkpoint(again)[0])
    for k in a:
        if ".experts." in k:
            assert torch.equal(a[k], b[k]), k


def test_gradient_sharing_inner(world1, tmp_path, hf_model, hf_dir, sample_data):
    """Sharing-inner: each expert its cluster's top neurons; experts may overlap (the dense
    identity no longer holds), shapes follow --expert-sizes, the model loads and runs."""
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
                "--split",
                "gradient",
                "--gradient-variant",
                "sharing-inner",
                "--expert-sizes",
                "40,40,30,50",
                "--split-data",
                sample_data,
                "--split-samples",
                "12",
                "--split-seq-length",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    model, meta = load_checkpoint(out)
    assert meta["moe"]["size_experts"] == [[40, 40, 30, 50]] * 2
    splits, infos = split_io.read_splits(out, 2, M.intermediate_size)
    assert infos[0]["variant"] == "sharing-inner"
    overlap = 0
    for s in splits:
        ids = np.concatenate(s)
        overlap += ids.size - np.unique(ids).size
    assert overlap > 0  # 160 slots for 96 neurons
    p = params(model)
    assert p["decoder.layers.0.mlp.experts.weight_gate"].shape == (160, M.hidden_size)
    assert p["decoder.layers.0.mlp.experts.weight_down"].shape == (M.hidden_size, 160)
    _experts_partition(model, hf_model, splits)
    assert torch.isfinite(logits_of(model, TOKENS)).all()


def test_gate_initialisation(world1, tmp_path, hf_dir):
    """mlp gate: random (seeded) init; weight_noise zero; linear gate zero."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
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
                    "--split-seed",
                    "3",
                    "--no-progress",
                ]
            )
            == 0
        )
    pa, pb = params(load_checkpoint(a)[0]), params(load_checkpoint(b)[0])
    g0 = "decoder.layers.0.mlp.gate."
    assert pa[g0 + "gate_network.0.weight"].abs().sum() > 0
    assert torch.equal(pa[g0 + "gate_network.0.weight"], pb[g0 + "gate_network.0.weight"])
    assert not torch.equal(
        pa[g0 + "gate_network.0.weight"], pa["decoder.layers.1.mlp.gate.gate_network.0.weight"]
    )
    assert pa[g0 + "weight_noise.weight"].abs().sum() == 0
    meta = json.loads((a / "megamoe.json").read_text())
    assert meta["moe"]["score_scale_factor"] is None  # default E / K = 2
