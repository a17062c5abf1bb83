"""Outside Slurm the same sbatch script trains through torchrun alone (a workstation), and
SIGUSR1 to the launcher makes the trainer checkpoint and stop."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_setup

from tests.conftest import TORCH_DIST_VARS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]


def test_fpt_script_outside_slurm_and_usr1(tmp_path, tmp_path_factory):
    # the pytest process's own torch.distributed variables (tests/conftest.py's world1) would
    # make the launcher reuse a port that is in use
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in TORCH_DIST_VARS and not k.startswith(("SLURM_", "SBATCH_"))
    }
    tiny = Path(tiny_setup.ensure(tmp_path_factory.getbasetemp() / "tiny-run", env))
    out = tmp_path / "out"
    env.update(
        MEGAMOE_ROOT=str(ROOT),
        MEGAMOE_ALLOW_CPU="1",
        MEGAMOE_PYTHON=sys.executable,
        pretrained_model=str(tiny / "model"),
        tokenizer_model=str(tiny / "tok.model"),
        dataset_dir=str(tiny / "train"),
        validation_dir=str(tiny / "valid"),
        prob_map="uniform",
        num_selects="2",
        scale_factor="2.0",
        block_size="32",
        per_device_train_batch_size="2",
        gradient_accumulation_steps="1",
        max_tokens=str(1000 * 128),
        warmup_steps="2",
        eval_steps="500",
        save_steps="500",
        logging_steps="1",
        bf16="false",
        lr="3e-3",
        num_gpu_per_node="2",
        output_dir=str(out),
        comment="workstation run",
    )
    log = open(tmp_path / "log", "w+")
    p = subprocess.Popen(
        ["bash", str(ROOT / "scripts/cpt/fpt.sh")],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    train_log = out / "train.log"
    while not (train_log.is_file() and "\nstep 1/" in train_log.read_text()):
        assert p.poll() is None, (tmp_path / "log").read_text()
        assert time.monotonic() < deadline, "training did not start within 240 s"
        time.sleep(0.5)
    p.send_signal(signal.SIGUSR1)  # the launcher (bash exec'd it) passes it to the trainers
    assert p.wait(timeout=180) == 0, (tmp_path / "log").read_text()
    text = (tmp_path / "log").read_text()
    assert "outside Slurm: torchrun on this machine, 2 process(es)" in text
    assert "torchrun --nnodes 1 --nproc_per_node 2 --node_rank 0 --master_addr 127.0.0.1" in text
    assert "max_steps: 1000\nglobal batch size: 4\n#tokens/batch: 128\n" in text
    assert "received SIGUSR1: stopped at step" in text
    ckpts = [d.name for d in out.glob("checkpoint-*")]
    assert len(ckpts) == 1 and 0 < int(ckpts[0].split("-")[1]) < 1000, ckpts
