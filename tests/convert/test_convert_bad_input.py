"""Bad input: one clear error line naming the file/flag/value; nothing half-written."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from megamoe.convert import main


def _run(capsys, *argv):
    rc = main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    return rc, err


def _leftovers(parent):
    return [
        p.name
        for p in parent.iterdir()
        if ".staging-" in p.name or ".tmp-" in p.name or ".old-" in p.name
    ]


def _copy_hf(hf_dir, dst, config_change=None, tensors=None):
    shutil.copytree(hf_dir, dst)
    if config_change:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_change)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _sd(hf_model):
    return {k: v.contiguous() for k, v in hf_model.state_dict().items()}


def test_missing_inputs(world1, tmp_path, capsys, hf_dir):
    rc, err = _run(
        capsys, "hf-to-megamoe", "--hf-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "o")
    )
    assert rc == 2 and "--hf-dir" in err and "no such directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = _run(capsys, "hf-to-megamoe", "--hf-dir", str(empty), "--output", str(tmp_path / "o"))
    assert rc == 2 and "config.json: not found" in err
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(hf_dir / "config.json", noweights)
    rc, err = _run(
        capsys, "hf-to-megamoe", "--hf-dir", str(noweights), "--output", str(tmp_path / "o")
    )
    assert rc == 2 and "no weights found" in err and "model.safetensors" in err
    rc, err = _run(
        capsys, "megamoe-to-hf", "--checkpoint", str(empty), "--output", str(tmp_path / "o")
    )
    assert rc == 2 and "not a megamoe checkpoint" in err and "hf-to-megamoe" in err
    assert not (tmp_path / "o").exists()


def test_missing_shard_and_tensor(world1, tmp_path, capsys, hf_model, hf_dir):
    d = tmp_path / "sharded"
    hf_model.save_pretrained(d, max_shard_size="40KB")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    rc, err = _run(capsys, "hf-to-megamoe", "--hf-dir", str(d), "--output", str(tmp_path / "o"))
    assert rc == 2 and "missing" in err and victim.name in err
    sd = _sd(hf_model)
    del sd["model.layers.1.mlp.down_proj.weight"]
    d2 = _copy_hf(hf_dir, tmp_path / "incomplete", tensors=sd)
    rc, err = _run(capsys, "hf-to-megamoe", "--hf-dir", str(d2), "--output", str(tmp_path / "o"))
    assert rc == 2 and "model.layers.1.mlp.down_proj.weight is missing" in err
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_not_llama(world1, tmp_path, capsys, hf_dir):
    d = _copy_hf(hf_dir, tmp_path / "mistral", {"model_type": "mistral"})
    rc, err = _run(capsys, "hf-to-megamoe", "--hf-dir", str(d), "--output", str(tmp_path / "o"))
    assert rc == 2 and "model_type 'mistral' is not LLaMA" in err and str(d / "config.json") in err


def test_shapes_disagree(world1, tmp_path, capsys, hf_dir):
    d = _copy_hf(hf_dir, tmp_path / "wrong", {"intermediate_size": 128})
    out = tmp_path / "o"
    rc, err = _run(capsys, "hf-to-megamoe", "--hf-dir", str(d), "--output", str(out))
    assert rc == 2 and "model.layers.0.mlp.gate_proj.weight has shape [96, 64]" in err
    assert "implies [128, 64]" in err and "model.safetensors" in err
    assert not out.exists() and not _leftovers(tmp_path)


def test_unused_tensors_refused(world1, tmp_path, capsys, hf_model, hf_dir):
    sd = _sd(hf_model)
    sd["model.layers.0.mlp.experts.extra.weight"] = torch.ones(3)
    d = _copy_hf(hf_dir, tmp_path / "extra", tensors=sd)
    out = tmp_path / "o"
    rc, err = _run(capsys, "hf-to-megamoe", "--hf-dir", str(d), "--output", str(out))
    assert rc == 2 and "model.layers.0.mlp.experts.extra.weight" in err and "silently" in err
    assert not out.exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize(
    "flags,match",
    [
        (
            ["--num-experts", "5", "--num-selects", "1"],
            "intermediate_size 96 is not divisible by --num-experts 5",
        ),
        (
            ["--num-experts", "4", "--num-selects", "6"],
            "--num-selects 6 must be between 1 and the number of experts 4",
        ),
        (["--num-experts", "4"], "--num-selects (top-k) is required"),
        (["--num-selects", "2"], "--num-experts is required"),
        (
            ["--num-experts", "4", "--num-selects", "2", "--expert-sizes", "10,20,30,40"],
            "sum to 100",
        ),
        (["--num-experts", "4", "--num-selects", "2", "--split", "graph"], "--split-data"),
        (
            ["--num-experts", "4", "--num-selects", "2", "--score-scale-factor", "x"],
            "--moe-calculator-score-scale-factor 'x'",
        ),
        (
            ["--num-experts", "4", "--num-selects", "2", "--score-scale-factor", "1,2,3"],
            "--moe-calculator-score-scale-factor has 3 values for 2 layers",
        ),
        (
            ["--num-experts", "4", "--num-selects", "2", "--expert-model-parallel-size", "3"],
            "--expert-model-parallel-size 3 must divide the number of experts 4",
        ),
        (
            ["--num-experts", "4", "--num-selects", "2", "--tensor-model-parallel-size", "3"],
            "--tensor-model-parallel-size 3 does not divide the model's num_attention_heads 4",
        ),
        (
            ["--num-experts", "4", "--num-selects", "2", "--split-file", "/nonexistent/split"],
            "no such directory",
        ),
    ],
)
def test_bad_moe_flags(world1, tmp_path, capsys, hf_dir, flags, match):
    out = tmp_path / "o"
    rc, err = _run(
        capsys,
        "hf-to-megamoe",
        "--hf-dir",
        str(hf_dir),
        "--output",
        str(out),
        "--model-type",
        "llama_moe",
        *flags,
    )
    assert rc == 2 and match in err, err
    assert not out.exists() and not _leftovers(tmp_path)


def test_moe_flags_for_dense_refused(world1, tmp_path, capsys, hf_dir):
    rc, err = _run(
        capsys,
        "hf-to-megamoe",
        "--hf-dir",
        str(hf_dir),
        "--output",
        str(tmp_path / "o"),
        "--num-experts",
        "4",
    )
    assert rc == 2 and "apply to --model-type llama_moe only" in err


def test_existing_output_refused_unless_overwrite(world1, tmp_path, capsys, hf_dir):
    out = tmp_path / "ck"
    assert _run(capsys, "hf-to-megamoe", "--hf-dir", str(hf_dir), "--output", str(out))[0] == 0
    before = (out / "megamoe.json").read_text()
    rc, err = _run(
        capsys,
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
    )
    assert rc == 2 and "already holds files" in err and "--overwrite" in err
    assert (out / "megamoe.json").read_text() == before
    # a failing --overwrite run leaves the old checkpoint in place
    rc, err = _run(
        capsys,
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
        "9",
        "--overwrite",
    )
    assert rc == 2 and (out / "megamoe.json").read_text() == before
    rc, _ = _run(
        capsys,
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
        "--overwrite",
    )
    assert rc == 0 and json.loads((out / "megamoe.json").read_text())["model_type"] == "llama_moe"
    assert (out / "split" / "layer_1.json").is_file() and not _leftovers(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "keep.txt").write_text("x")
    rc, err = _run(capsys, "megamoe-to-hf", "--checkpoint", str(out), "--output", str(hf))
    assert rc == 2 and "already holds files" in err and (hf / "keep.txt").is_file()
    # a directory megamoe did not write is never replaced, --overwrite or not
    rc, err = _run(
        capsys, "megamoe-to-hf", "--checkpoint", str(out), "--output", str(hf), "--overwrite"
    )
    assert rc == 2 and "megamoe did not write" in err and (hf / "keep.txt").read_text() == "x"
    hf2 = tmp_path / "hf2"
    assert _run(capsys, "megamoe-to-hf", "--checkpoint", str(out), "--output", str(hf2))[0] == 0
    assert (
        _run(
            capsys, "megamoe-to-hf", "--checkpoint", str(out), "--output", str(hf2), "--overwrite"
        )[0]
        == 0
    )
    assert (hf2 / "model.safetensors").is_file()
    # an empty directory is fine without --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, "megamoe-to-hf", "--checkpoint", str(out), "--output", str(empty))[0] == 0


def test_export_bad_flags(world1, tmp_path, capsys, hf_dir):
    ck = tmp_path / "ck"
    assert _run(capsys, "hf-to-megamoe", "--hf-dir", str(hf_dir), "--output", str(ck))[0] == 0
    for flags, match in (
        (["--format", "llama_moe"], "holds a llama model; export it with --format llama"),
        (["--max-shard-size", "lots"], "--max-shard-size 'lots'"),
        (["--tokenizer", str(tmp_path / "nope")], "--tokenizer"),
        (["--tokenizer", str(tmp_path)], "no tokenizer files"),
    ):
        rc, err = _run(
            capsys,
            "megamoe-to-hf",
            "--checkpoint",
            str(ck),
            "--output",
            str(tmp_path / "hf"),
            *flags,
        )
        assert rc == 2 and match in err, (flags, err)
        assert not (tmp_path / "hf").exists() and not _leftovers(tmp_path)
    shutil.rmtree(ck / "model")
    rc, err = _run(
        capsys, "megamoe-to-hf", "--checkpoint", str(ck), "--output", str(tmp_path / "hf")
    )
    assert rc == 2 and "model/ directory is missing" in err


def test_llama_moe_source_rules(world1, tmp_path, capsys, hf_dir):
    ck, hf = tmp_path / "ck", tmp_path / "hfmoe"
    assert (
        _run(
            capsys,
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
            "2",
        )[0]
        == 0
    )
    assert _run(capsys, "megamoe-to-hf", "--checkpoint", str(ck), "--output", str(hf))[0] == 0
    for flags, match in (
        (["--model-type", "llama"], "is a LLaMA-MoE model"),
        (["--num-experts", "8"], "fixed by the model's weights"),
        (["--gate-network", "linear"], "has gate_network 'mlp'"),
        (["--split", "clustering"], "already is a LLaMA-MoE model"),
    ):
        rc, err = _run(
            capsys, "hf-to-megamoe", "--hf-dir", str(hf), "--output", str(tmp_path / "o"), *flags
        )
        assert rc == 2 and match in err, (flags, err)
    # a missing expert tensor is named
    from megamoe.formats.hf_files import HFWeights

    w = HFWeights(hf)
    sd = {
        k: w.get(k) for k in w.names() if k != "model.layers.1.mlp.calculator.experts.weight_down.3"
    }
    save_file(sd, str(hf / "model.safetensors"))
    rc, err = _run(capsys, "hf-to-megamoe", "--hf-dir", str(hf), "--output", str(tmp_path / "o"))
    assert rc == 2 and "weight_down.3 is missing" in err
