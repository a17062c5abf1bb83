"""A damaged newest checkpoint: named, kept (renamed, byte for byte), and the run resumes from the
newest one that verifies; a run directory reused for another model is refused."""

import glob
import os
import shutil

import pytest

from megamoe.checkpoint import layout
from tests.reliability.conftest import tree
from tests.train import fixtures as F

STEPS = 6  # checkpoints at 3 and 6


@pytest.fixture(scope="module")
def run6(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ck") / "run")
    r = F.run_train(F.train_argv(tiny.moe, tiny.data, tiny.valid, out, max_steps=STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [os.path.basename(p) for _, p in layout.list_checkpoints(out)] == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    return out


def _damage(ckpt: str, what: str) -> str:
    """Damage one file of the checkpoint as a crash or a bad disk would; returns its name."""
    if what == "model shard":
        f = sorted(glob.glob(os.path.join(ckpt, "model", "*.distcp")))[0]
    elif what == "meta file":
        f = os.path.join(ckpt, "megamoe.json")
    elif what == "rank state":
        f = os.path.join(ckpt, "rank_state_00000.pt")
    else:
        f = os.path.join(ckpt, "model", "common.pt")
    data = open(f, "rb").read()
    if what == "bit flip":
        f = sorted(glob.glob(os.path.join(ckpt, "optimizer", "*.distcp")))[0]
        data = open(f, "rb").read()
        data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]  # same size, other bytes
    else:
        data = data[: len(data) // 2]  # truncated
    open(f, "wb").write(data)
    return os.path.relpath(f, ckpt)


@pytest.mark.parametrize(
    "what", ["model shard", "meta file", "rank state", "common.pt", "bit flip"]
)
def test_damaged_newest_checkpoint_falls_back(tiny, run6, tmp_path, what, no_children_left):
    out = str(tmp_path / "run")
    shutil.copytree(run6, out)
    newest = os.path.join(out, "checkpoint-6")
    name = _damage(newest, what)
    damaged = tree(newest)
    r = F.run_train(F.train_argv(tiny.moe, tiny.data, tiny.valid, out, max_steps=STEPS + 2))
    err = r.stdout + r.stderr
    assert r.returncode == 0, err[-3000:]
    assert name in err and "is damaged" in err and "Traceback" not in err
    assert f"resuming from {os.path.join(out, 'checkpoint-3')}" in err
    (kept,) = glob.glob(newest + ".corrupt-*")  # renamed, never deleted, bytes unchanged
    assert tree(kept) == {k.replace(newest, kept): v for k, v in damaged.items()}
    steps = sorted(F.log_records(out, "train"))
    assert steps[-1] == STEPS + 2 and os.path.isdir(os.path.join(out, f"checkpoint-{STEPS + 2}"))
    log = open(os.path.join(out, "train.log")).read()
    assert name in log  # the warning is in the run's log too


def test_megamoe_check_reports_damage_without_touching(tiny, run6, tmp_path):
    from megamoe.config import parse_run_config
    from megamoe.train.plan import make_plan

    out = str(tmp_path / "run")
    shutil.copytree(run6, out)
    _damage(os.path.join(out, "checkpoint-6"), "model shard")
    before = tree(out)
    plan, found = make_plan(
        parse_run_config(F.train_argv(tiny.moe, tiny.data, tiny.valid, out)), cuda=False
    )  # repair=False: what `megamoe check` does
    assert plan.resume_from.endswith("checkpoint-3")
    assert any("checkpoint-6 is damaged" in f.text() for f in found)
    assert tree(out) == before


@pytest.mark.parametrize(
    "other,words",
    [
        (dict(pretrained_model="dense", model_type="llama"), "holds a run started from"),
        (dict(training_mode="lora"), "was trained with --training_mode fpt"),
    ],
)
def test_another_run_in_the_same_output_dir_is_refused_before_any_work(
    tiny, run6, tmp_path, other, words
):
    """An --output_dir holding a run of another pretrained model or training mode is not resumed
    as if it were this run's."""
    out = str(tmp_path / "run")
    shutil.copytree(run6, out)
    before = tree(out)
    flags = dict(other, max_steps=STEPS + 2)
    if flags.get("pretrained_model") == "dense":
        flags["pretrained_model"] = tiny.dense
    argv = F.train_argv(tiny.moe, tiny.data, tiny.valid, out)
    argv += [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    r = F.run_train(argv)
    assert r.returncode == 2 and words in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and tree(out) == before
