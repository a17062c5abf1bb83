"""Bad flags and inputs: one line per problem naming the flag or file and what to do, exit 2,
before any model is built; nothing of the user's changes."""

import os
import shutil
import subprocess
import sys

import pytest

from megamoe.train.main import main as train
from tests.reliability.conftest import tree
from tests.train import fixtures as F


@pytest.mark.parametrize(
    "flags,words",
    [
        ({"adam_beta1": 1.5}, "--adam_beta1 1.5 must be in [0, 1)"),
        ({"adam_beta2": -0.1}, "--adam_beta2 -0.1 must be in [0, 1)"),
        ({"weight_decay": -1}, "--weight_decay -1.0 must be >= 0"),
        ({"seed": -1}, "--seed -1 must be between 0 and 2^32 - 1"),
        ({"max_grad_norm": -1}, "--max_grad_norm -1.0 must be >= 0: 0 turns clipping off"),
        ({"adam_epsilon": 0}, "--adam_epsilon 0.0 must be positive"),
        ({"learning_rate": "nan"}, "--learning_rate nan must be a positive number"),
        ({"num_selects": 0}, "--num_selects 0 must be between 1 and the number of experts 4"),
        (
            {"moe_calculator_score_scale_factor": -2},
            "--moe_calculator_score_scale_factor -2 must be positive",
        ),
        ({"save_total_limit": 0}, "--save_total_limit 0 must be at least 1"),
        ({"exit_interval": 0}, "--exit_interval 0 must be at least 1"),
        (
            {"dds_c": 2, "dynamic_data_selection": "sheared_llama"},
            "--dds_c 2.0 must be between 0 and 1",
        ),
        ({"block_size": 1}, "--block_size 1 must be at least 2"),
    ],
)
def test_bad_values_are_one_line_each(tiny, tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    if "dynamic_data_selection" in flags:
        flags = dict(flags, ref_loss=tiny.ref)
    rc = train(F.train_argv(tiny.moe, tiny.data, tiny.valid, str(out), **flags))
    err = capsys.readouterr().err
    assert rc == 2 and words in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert not out.exists()  # refused before any work


def test_abbreviated_and_misspelled_flags_are_refused(tiny, tmp_path, capsys):
    argv = F.train_argv(tiny.moe, tiny.data, tiny.valid, str(tmp_path / "out"))
    with pytest.raises(SystemExit) as e:
        train(argv + ["--learn", "5e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --learn 5e-3" in err and len(err.strip().splitlines()) == 1


def test_both_spellings_reach_the_same_knob():
    from megamoe.config import parse_run_config

    a = parse_run_config(
        ["--num_selects", "2", "--tensor-model-parallel-size", "2", "--gate-network-type", "linear"]
    )
    b = parse_run_config(
        ["--num-selects", "2", "--tensor_model_parallel_size", "2", "--gate_network_type", "linear"]
    )
    assert a == b and a.moe.num_selects == 2 and a.moe.gate_network == "linear"


def test_tokenizer_of_another_model_is_refused(tiny, tmp_path, capsys):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["alpha beta gamma delta"] * 50),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=40,
        model_type="bpe",
        minloglevel=2,
    )
    rc = train(
        F.train_argv(
            tiny.moe,
            tiny.data,
            tiny.valid,
            str(tmp_path / "out"),
            tokenizer_model=str(tmp_path / "tok.model"),
        )
    )
    err = capsys.readouterr().err
    assert rc == 2 and "has 40 tokens but the model's vocab_size is 128" in err, err


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_preprocess_workers(tmp_path, capsys, helpers, sp_model, workers):
    from megamoe.data.preprocess import main

    inp = helpers.write_jsonl(tmp_path / "x.jsonl", [{"text": "a b c"}])
    rc = main(
        [
            "--input",
            inp,
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-model",
            sp_model,
            "--workers",
            workers,
            "--no-progress",
        ]
    )
    assert rc == 2 and f"--workers {workers} must be at least 1" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["x.jsonl"]


def test_estimate_from_a_run_of_another_shape_warns(tiny, tmp_path):
    out = tmp_path / "run"
    r = F.run_train(
        F.train_argv(
            tiny.moe, tiny.data, tiny.valid, str(out), max_steps=2, eval_steps=0, save_steps=0
        )
    )
    assert r.returncode == 0, r.stderr[-2000:]
    script = os.path.join(
        F.ROOT, "scripts/cpt/16_2/baseline_112gpus_sheared_llama_portion_fluency_sf8.sh"
    )
    r = subprocess.run(
        [sys.executable, "-m", "megamoe", "estimate", script, "--from_run", str(out)],
        cwd=F.ROOT,
        env=F.clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "warning: that run is not the one estimated" in r.stderr
    assert "block_size 32 there, 4096 here" in r.stderr and "num_nodes 1 there, 14 here" in r.stderr


def test_megatron_compatible_empty_documents_and_bad_text(tmp_path, capsys, helpers, sp_model):
    """An empty text is a document boundary with no sequence (Megatron-LM's encoder); a lone
    surrogate is a file:line error."""
    import numpy as np

    from megamoe.data.indexed import IndexedDataset
    from megamoe.data.preprocess import main

    recs = [{"text": "a b"}, {"text": ""}, {"text": "   "}, {"text": "\u200b"}, {"text": "c d"}]
    inp = helpers.write_jsonl(tmp_path / "x.jsonl", recs)
    assert (
        main(
            [
                "--input",
                inp,
                "--output-prefix",
                str(tmp_path / "o"),
                "--tokenizer-model",
                sp_model,
                "--append-eod",
                "--no-progress",
            ]
        )
        == 0
    )
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert len(ds) == 2 and ds[0][-1] == 2 and ds[1][-1] == 2  # two sequences, each with EOD
    assert np.asarray(ds.document_indices).tolist() == [0, 1, 1, 1, 1, 2]  # five documents
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "\\ud800 broken"}\n')
    before = tree(tmp_path / "o_text_document.bin", tmp_path / "o_text_document.idx")
    assert (
        main(
            [
                "--input",
                str(bad),
                "--output-prefix",
                str(tmp_path / "o"),
                "--tokenizer-model",
                sp_model,
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "lone surrogate" in err and "Traceback" not in err
    assert tree(tmp_path / "o_text_document.bin", tmp_path / "o_text_document.idx") == before


def _data_copy(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    return data


@pytest.mark.parametrize(
    "fault,words",
    [
        ("truncated .bin", "data file truncated"),
        ("truncated .idx", "index truncated"),
        ("foreign .idx", "not a Megatron indexed dataset index"),
        ("missing .bin", "the matching data file"),
        ("a domain shorter than one block", "fewer than one block of 32"),
        (
            "token ids beyond the vocabulary",
            "holds token id 300, beyond the model's vocab_size 128",
        ),
    ],
)
def test_data_faults_are_found_before_the_model_is_built(tiny, tmp_path, capsys, fault, words):
    import numpy as np

    from megamoe.data.indexed import IndexedDatasetWriter

    data = _data_copy(tiny, tmp_path)
    prefix = data / "prose" / "prose_text_document"
    if fault == "truncated .bin":
        b = prefix.with_suffix(".bin")
        b.write_bytes(b.read_bytes()[:-10])
    elif fault == "truncated .idx":
        i = prefix.with_suffix(".idx")
        i.write_bytes(i.read_bytes()[:-5])
    elif fault == "foreign .idx":
        prefix.with_suffix(".idx").write_bytes(b"PK\x03\x04 not an index at all" * 4)
    elif fault == "missing .bin":
        prefix.with_suffix(".bin").unlink()
    elif fault == "a domain shorter than one block":
        for f in (data / "prose").iterdir():
            f.unlink()
        with IndexedDatasetWriter(str(prefix), np.uint16) as w:
            w.add_document(np.arange(3, 20))
    else:
        for f in (data / "prose").iterdir():
            f.unlink()
        with IndexedDatasetWriter(str(prefix), np.uint16) as w:
            w.add_document(np.arange(250, 301))
    before = tree(data)
    out = tmp_path / "out"
    rc = train(F.train_argv(tiny.moe, str(data), tiny.valid, str(out)))
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "prose" in err, err
    assert "Traceback" not in err and not out.exists()  # before any work
    assert tree(data) == before


def test_out_of_vocabulary_data_without_stats_stops_at_the_first_batch(tiny, tmp_path):
    """Data from another tool (no stats file): found when read, named, exit 2."""
    import numpy as np

    from megamoe.data.indexed import IndexedDatasetWriter

    data = _data_copy(tiny, tmp_path)
    for dom in os.listdir(data):
        prefix = data / dom / f"{dom}_text_document"
        for f in (data / dom).iterdir():
            f.unlink()
        with IndexedDatasetWriter(str(prefix), np.uint16) as w:
            w.add_document(np.arange(100, 400) % 300)
        (data / dom / f"{dom}_text_document.stats.json").unlink()
    r = F.run_train(F.train_argv(tiny.moe, str(data), None, str(tmp_path / "out"), eval_steps=0))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "beyond the model's vocab_size 128" in r.stderr and "_text_document" in r.stderr
    assert "Traceback" not in r.stderr
