"""Tensor, pipeline, expert and data parallelism on real GPUs with NCCL (`pytest -m multigpu`).

Every run is the real trainer (`torchrun -m megamoe.train`) on the same LLaMA-MoE checkpoint and
data, 20 steps, gate noise off (noise is drawn per rank, so it differs between layouts by
design). The global batch is 8 sequences in micro-batches of 2 in every layout (gradient
accumulation 4 / DP), so every layout sees the same micro-batches and the same balance losses as
the single-GPU run, and its 20 losses must match the single-GPU ones: tightly in fp32 (the
reduction order alone differs), within bf16 rounding in bf16. The distributed optimizer's
checkpoint, saved at one layout, resumes at another and continues the single-GPU curve.

Skipped without enough GPUs (CI has none): run on the lent 2- and 4-GPU H200 machines.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train import fixtures as F

pytestmark = [pytest.mark.multigpu, pytest.mark.gpu]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
STEPS, MICRO, GLOBAL = 20, 2, 8
TOL = {"fp32": 2e-4, "bf16": 3e-2}  # max relative difference of a step's loss

# (name, TP, PP, EP, GPUs)
LAYOUTS = [
    ("ep2", 1, 1, 2, 2), ("tp2", 2, 1, 1, 2), ("pp2", 1, 2, 1, 2), ("dp2", 1, 1, 1, 2),
    ("ep4", 1, 1, 4, 4), ("ep2dp2", 1, 1, 2, 4), ("tp2ep2", 2, 1, 2, 4), ("tp2pp2", 2, 2, 1, 4),
]


def _needs(n):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA GPUs, found {GPUS}")


def _pretrained_main(path):
    from megamoe import checkpoint, parallel
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.model.llama import build_model

    m = ModelConfig(vocab_size=F.VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    e = MoEConfig(num_experts=8, num_selects=2, gate_add_noise=False)
    parallel.initialize(parallel.ParallelLayout(), seed=0)
    checkpoint.save(path, build_model(m, e), checkpoint.make_meta(m, e))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if GPUS < 1:
        pytest.skip("needs a CUDA GPU")
    root = tmp_path_factory.mktemp("multigpu")
    data = F.write_domains(str(root / "data"), n_docs=200, seed=0)
    pre = str(root / "pre")
    code = f"import sys; sys.path.insert(0, {F.ROOT!r}); from tests.multigpu.test_multigpu_parity import _pretrained_main; _pretrained_main({pre!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=F.clean_env(CUDA_VISIBLE_DEVICES="0"), cwd=F.ROOT)
    return root, data, pre


def train(setup, name, tp=1, pp=1, ep=1, gpus=1, precision="fp32", max_steps=STEPS, out=None, **flags):
    root, data, pre = setup
    dp = gpus // (tp * pp)
    out = out or str(root / f"{name}-{precision}")
    opts = dict(per_device_train_batch_size=MICRO, gradient_accumulation_steps=GLOBAL // (MICRO * dp),
                max_steps=max_steps, learning_rate=1e-3, warmup_steps=2, eval_steps=0, save_steps=0,
                gate_add_noise="false", bf16="true" if precision == "bf16" else "false",
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                expert_model_parallel_size=ep)
    opts.update(flags)
    argv = F.train_argv(pre, data, None, out, **opts)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "megamoe.train", *argv]
    env = F.clean_env(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                      CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))
    p = subprocess.run(cmd, cwd=F.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return out


def worst_rel(a, b):
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


class _Reference(dict):
    """The single-GPU curves, each trained when first asked for."""

    def __init__(self, setup):
        super().__init__()
        self.setup = setup

    def __missing__(self, precision):
        self[precision] = F.train_losses(train(self.setup, "single", precision=precision))
        return self[precision]


@pytest.fixture(scope="module")
def reference(setup):
    return _Reference(setup)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name,tp,pp,ep,gpus", [pytest.param(*lay, marks=_needs(lay[-1])) for lay in LAYOUTS],
                         ids=[lay[0] for lay in LAYOUTS])
def test_layout_matches_single_gpu(setup, reference, name, tp, pp, ep, gpus, precision):
    got = F.train_losses(train(setup, name, tp, pp, ep, gpus, precision))
    ref = reference[precision]
    err = worst_rel(got, ref)
    print(f"{name} {precision}: worst relative loss difference over {STEPS} steps {err:.2e} "
          f"(first {ref[0]:.4f}, last {ref[-1]:.4f})")
    assert ref[-1] < ref[0]  # it trained
    assert err < TOL[precision], (name, precision, err, got, ref)


@pytest.mark.parametrize("first,second", [
    pytest.param(("single", 1, 1, 1, 1), ("single", 1, 1, 1, 1), marks=_needs(1)),  # the load path itself
    pytest.param(("ep2", 1, 1, 2, 2), ("tp2", 2, 1, 1, 2), marks=_needs(2)),
    pytest.param(("tp2", 2, 1, 1, 2), ("single", 1, 1, 1, 1), marks=_needs(2)),
    pytest.param(("dp2", 1, 1, 1, 2), ("pp2", 1, 2, 1, 2), marks=_needs(2))],
    ids=["single->single", "ep2->tp2", "tp2->single", "dp2->pp2"])
def test_resume_at_another_layout(setup, reference, tmp_path, first, second):
    """Save the distributed optimizer at step 10 in one layout, resume to step 20 in another:
    the curve continues the single-GPU one (fp32)."""
    out = str(tmp_path / "run")
    half = STEPS // 2
    # the schedule must be that of a 20-step run: ask for 20, stop after saving at 10
    train(setup, first[0], *first[1:], out=out, save_steps=half, exit_interval=half,
          use_distributed_optimizer="true")
    first_half = F.train_losses(out)
    assert len(first_half) == half
    train(setup, second[0], *second[1:], out=out, use_distributed_optimizer="true")
    got = F.train_losses(out)
    err = worst_rel(got, reference["fp32"])
    print(f"{first[0]} -> {second[0]}: worst relative loss difference {err:.2e}")
    assert err < TOL["fp32"], (got, reference["fp32"])
