"""A run that changes its layout at every resume continues the single-process loss curve (CPU, gloo).

The real trainer under torchrun: 8 steps in four legs of two, EP=2 -> PP=2 -> TP=2 (+SP) ->
one process, each leg stopping through --exit_interval (which saves) and the next resuming from
that checkpoint: model weights, Adam state (per parameter, the experts' per expert) and the
schedule are resharded at every step. The global batch is the same in every layout (gradient
accumulation 4 / DP), gate noise is off, fp32: the losses must match the uninterrupted
single-process run up to the reduction order. tests/multigpu does the same with the distributed
optimizer on GPUs.
"""
from __future__ import annotations

import subprocess
import sys

from tests.train import fixtures as F

STEPS, LEG, MICRO, GLOBAL = 8, 2, 1, 4


def train(tiny, out, tp=1, pp=1, ep=1, procs=1, **flags):
    dp = procs // (tp * pp)
    opts = dict(per_device_train_batch_size=MICRO, gradient_accumulation_steps=GLOBAL // (MICRO * dp),
                max_steps=STEPS, learning_rate=3e-3, warmup_steps=2, eval_steps=0, save_steps=0,
                gate_add_noise="false", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                expert_model_parallel_size=ep, sequence_parallel="true" if tp > 1 else "false")
    opts.update(flags)
    argv = F.train_argv(tiny.moe, tiny.data, None, out, **opts)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "megamoe.train", *argv]
    p = subprocess.run(cmd, cwd=F.ROOT, env=F.clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"tp={tp} pp={pp} ep={ep} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"


def test_resume_at_another_layout_each_leg(tiny, tmp_path):
    ref_out = str(tmp_path / "single")
    train(tiny, ref_out)
    ref = F.train_losses(ref_out)
    assert len(ref) == STEPS

    out = str(tmp_path / "changing")
    legs = [dict(ep=2, procs=2), dict(pp=2, procs=2), dict(tp=2, procs=2), dict(procs=1)]
    for i, leg in enumerate(legs):
        train(tiny, out, save_steps=LEG, exit_interval=LEG, **leg)
        assert len(F.train_losses(out)) == LEG * (i + 1), (leg, F.train_losses(out))
    got = F.train_losses(out)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    print(f"EP=2 -> PP=2 -> TP=2 -> single, two steps each: losses {got}\n"
          f"single process: {ref}\nworst relative difference {worst:.2e}")
    assert worst < 1e-5, (got, ref)
