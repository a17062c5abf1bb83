"""Nothing a user owns is lost: the cases that deleted or dropped data, and their families."""

import json
import shutil
import subprocess
import sys

import pytest

from megamoe.convert import main as convert
from tests.reliability.conftest import tree
from tests.train import fixtures as F


def _run(capsys, *argv):
    rc = convert([*argv, "--no-progress"])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_and_ckpt(tmp_path_factory):
    """A tiny HF LLaMA (transformers) and a training run's folder with one checkpoint."""
    from tests.convert.conftest import M
    from tests.helpers import hf_llama

    root = tmp_path_factory.mktemp("owned")
    hf = root / "hf"
    hf_llama(M).save_pretrained(hf, safe_serialization=True)
    run = root / "run"
    run.mkdir()
    assert (
        convert(
            [
                "hf-to-megamoe",
                "--hf-dir",
                str(hf),
                "--output",
                str(run / "checkpoint-120"),
                "--no-progress",
            ]
        )
        == 0
    )
    (run / "train.log").write_text("the run's log\n")
    (run / "runs").mkdir()
    (run / "runs" / "events.out.tfevents.1").write_bytes(b"tensorboard")
    return root, hf, run


@pytest.mark.parametrize("case", ["output_is_input", "output_is_the_run", "output_above_input"])
def test_overwrite_never_replaces_an_input(
    world1, capsys, tmp_path, hf_and_ckpt, case, no_children_left
):
    root, hf, run = hf_and_ckpt
    if case == "output_is_input":
        argv = ["hf-to-megamoe", "--hf-dir", str(hf), "--output", str(hf), "--overwrite"]
        words, watched = "is --hf-dir", [hf]
    elif case == "output_is_the_run":
        argv = [
            "megamoe-to-hf",
            "--checkpoint",
            str(run / "checkpoint-120"),
            "--output",
            str(run),
            "--overwrite",
        ]
        words, watched = "contains --checkpoint", [run]
    else:  # a folder above the input, holding other things of the user's
        above = tmp_path / "models"
        shutil.copytree(hf, above / "llama")
        (above / "notes.txt").write_text("mine")
        argv = [
            "hf-to-megamoe",
            "--hf-dir",
            str(above / "llama"),
            "--output",
            str(above),
            "--overwrite",
        ]
        words, watched = "contains --hf-dir", [above]
    before = tree(*watched)
    rc, err = _run(capsys, *argv)
    assert rc == 2 and words in err and "refusing" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert tree(*watched) == before


def test_overwrite_replaces_only_megamoe_outputs(
    world1, capsys, tmp_path, hf_and_ckpt, no_children_left
):
    root, hf, run = hf_and_ckpt
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.bin").write_bytes(b"\x00" * 100)
    before = tree(mine)
    rc, err = _run(
        capsys, "hf-to-megamoe", "--hf-dir", str(hf), "--output", str(mine), "--overwrite"
    )
    assert rc == 2 and "megamoe did not write" in err and tree(mine) == before
    out = tmp_path / "ck"
    assert _run(capsys, "hf-to-megamoe", "--hf-dir", str(hf), "--output", str(out))[0] == 0
    first = json.loads((out / "megamoe.json").read_text())
    assert (
        _run(
            capsys,
            "hf-to-megamoe",
            "--hf-dir",
            str(hf),
            "--output",
            str(out),
            "--overwrite",
            "--model-type",
            "llama_moe",
            "--num-experts",
            "4",
            "--num-selects",
            "2",
        )[0]
        == 0
    )
    assert first["model_type"] == "llama"  # its own output: replaced
    assert json.loads((out / "megamoe.json").read_text())["model_type"] == "llama_moe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mine"]  # nothing left beside


def test_a_killed_conversion_leaves_what_the_next_run_removes(
    world1, capsys, tmp_path, hf_and_ckpt
):
    import socket

    from megamoe.outputs import mark

    root, hf, run = hf_and_ckpt
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    left = tmp_path / f".out.staging-{socket.gethostname()}-{dead.pid}"
    left.mkdir()
    mark(left, "megamoe convert hf-to-megamoe")
    (left / "half.safetensors").write_bytes(b"x" * 1000)
    # look-alikes of a user's stay: another host's, unmarked, or another name
    keep = [
        tmp_path / f".out.staging-otherhost-{dead.pid}",
        tmp_path / f".out.staging-{socket.gethostname()}-1",
        tmp_path / ".out.backup-20240101",
        tmp_path / ".out.keep-me",
    ]
    for k in keep:
        k.mkdir()
        (k / "mine.txt").write_text("keep")
    mark(keep[0], "megamoe convert hf-to-megamoe")
    before = tree(*keep)
    assert (
        _run(capsys, "hf-to-megamoe", "--hf-dir", str(hf), "--output", str(tmp_path / "out"))[0]
        == 0
    )
    assert not left.exists() and tree(*keep) == before


def _slimpajama(n, seed):
    sets = [
        "RedPajamaArXiv",
        "RedPajamaBook",
        "RedPajamaC4",
        "RedPajamaCommonCrawl",
        "RedPajamaGithub",
        "RedPajamaStackExchange",
        "RedPajamaWikipedia",
    ]
    return [
        {"text": f"doc {seed}-{i}", "meta": {"redpajama_set_name": sets[i % 7]}} for i in range(n)
    ]


@pytest.mark.parametrize("how", ["folders", "glob", "files"])
def test_split_domains_keeps_every_record_of_repeated_file_names(tmp_path, helpers, how):
    from megamoe.data.split_domains import main

    sp = tmp_path / "SP" / "train"
    n = 0
    for chunk in (1, 2, 3):
        helpers.write_jsonl(
            sp / f"chunk{chunk}" / "example_train_0.jsonl", _slimpajama(20 + chunk, chunk)
        )
        n += 20 + chunk
    inputs = {
        "folders": [str(sp / f"chunk{c}") for c in (1, 2, 3)],
        "glob": [str(sp / "*" / "*.jsonl")],
        "files": [str(sp / f"chunk{c}" / "example_train_0.jsonl") for c in (1, 2, 3)],
    }[how]
    before = tree(sp)
    out = tmp_path / "raw"
    assert main(["--input", *inputs, "--output-dir", str(out)]) == 0
    on_disk = [
        json.loads(line)
        for d in out.iterdir()
        if d.is_dir()
        for f in d.iterdir()
        for line in f.read_text().splitlines()
    ]
    assert len(on_disk) == n and len({r["text"] for r in on_disk}) == n
    assert tree(sp) == before


def test_split_domains_chunk_by_chunk_into_one_folder_is_refused(tmp_path, helpers, capsys):
    """Runs of one chunk each would give their files the same names: the second run refuses
    rather than replace the first one's output."""
    from megamoe.data.split_domains import main

    sp = tmp_path / "SP"
    for c in (1, 2):
        helpers.write_jsonl(sp / f"chunk{c}" / "example_train_0.jsonl", _slimpajama(14, c))
    out = tmp_path / "raw"
    assert main(["--input", str(sp / "chunk1"), "--output-dir", str(out)]) == 0
    before = tree(out)
    assert main(["--input", str(sp / "chunk2"), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "would replace" in err and "--overwrite" in err and tree(out) == before
    both = tmp_path / "both"  # the way: one run over both chunks
    assert main(["--input", str(sp / "chunk1"), str(sp / "chunk2"), "--output-dir", str(both)]) == 0
    assert sum(len(f.read_text().splitlines()) for f in both.rglob("*.jsonl")) == 28


@pytest.mark.parametrize("domain", ["/tmp/elsewhere", "../up", "..", ".hidden", ""])
def test_split_domains_keeps_every_domain_inside_the_output(tmp_path, helpers, capsys, domain):
    from megamoe.data.split_domains import main

    inp = helpers.write_jsonl(
        tmp_path / "in.jsonl", [{"text": "x", "meta": {"redpajama_set_name": domain}}]
    )
    out = tmp_path / "raw"
    assert main(["--input", inp, "--output-dir", str(out), "--unknown", "keep"]) == 2
    assert "cannot be a folder name" in capsys.readouterr().err
    assert not any(p.is_file() for p in out.rglob("*") if p.name != ".megamoe-output")


def test_split_domains_never_replaces_a_users_file(tmp_path, helpers, capsys):
    from megamoe.data.split_domains import main

    inp = helpers.write_jsonl(tmp_path / "in" / "part.jsonl", _slimpajama(14, 0))
    out = tmp_path / "raw"
    (out / "en_arxiv").mkdir(parents=True)
    (out / "en_arxiv" / "part.jsonl").write_text("the user's own file\n")
    before = tree(out)
    assert main(["--input", inp, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "part.jsonl" in err and "megamoe did not write it" in err and tree(out) == before
    fresh = tmp_path / "fresh"
    assert main(["--input", inp, "--output-dir", str(fresh)]) == 0
    assert main(["--input", inp, "--output-dir", str(fresh)]) == 2  # no silent replacing
    assert main(["--input", inp, "--output-dir", str(fresh), "--overwrite"]) == 0  # its own files
    assert main(["--input", inp, "--output-dir", str(out), "--overwrite"]) == 2  # never a user's
    assert tree(out) == before


SIDE_EFFECT_SCRIPT = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
touch {marker}
rm -rf {victim}
python -c 'open("{marker2}", "w")'
lr=$((2 * 3))e-4
exec bash scripts/launch.sh --model_type llama_moe --learning_rate $lr --num_nodes 1 --num_gpu_per_node 1
"""


@pytest.mark.parametrize("verb", ["check", "estimate"])
def test_check_and_estimate_never_run_the_script(tmp_path, verb, no_children_left):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("data")
    script = tmp_path / "job.sh"
    script.write_text(
        SIDE_EFFECT_SCRIPT.format(marker=tmp_path / "ran", victim=victim, marker2=tmp_path / "ran2")
    )
    before = tree(victim)
    extra = (
        [
            "--tokens",
            "1e9",
            "--block_size",
            "64",
            "--per_device_train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "1",
        ]
        if verb == "estimate"
        else []
    )
    r = subprocess.run(
        [sys.executable, "-m", "megamoe", verb, str(script), *extra],
        cwd=F.ROOT,
        env=F.clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not (tmp_path / "ran").exists() and not (tmp_path / "ran2").exists()
    assert tree(victim) == before
    if verb == "check":  # it read the flags all the same: 2 * 3 = 6 -> 6e-4
        assert "learning_rate=0.0006" in r.stdout, r.stdout + r.stderr


def test_the_demo_refuses_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "run" / "train_log.jsonl").write_text('{"kind": "end", "step": 1}\n')
    before = tree(mine)
    r = subprocess.run(
        [sys.executable, "-m", "megamoe.demo", "--quick", "--output_dir", str(mine)],
        cwd=F.ROOT,
        env=F.clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "holds files the demo did not write" in r.stderr
    assert tree(mine) == before
