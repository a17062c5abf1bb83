"""Tensor, pipeline, expert and data parallelism on real GPUs with NCCL (`pytest -m multigpu`).

Every run is the real trainer (megamoe.train) on the same LLaMA-MoE checkpoint and data, 20 steps,
gate noise off (noise is drawn per rank, so it differs between layouts by design). The global
batch is 8 sequences in micro-batches of 2 in every layout (gradient accumulation 4 / DP), so
every layout sees the same micro-batches and balance losses as the single-GPU run.

fp32: a top-k gate turns rounding differences into different routing when a token's k-th and
(k+1)-th gate logits nearly tie, and from then on the two runs train different models
(routing_probe.py, tests/distributed/test_routing_flips.py; on the 2-GPU H200, EP=2 and TP=2 both
route one near-tie token differently at step 18, then differ by 2.4e-5). So every run records its
routing, and a layout must match the single-GPU losses to fp32 rounding (runs.EXACT) up to the
first step whose routing differs, that first difference must be a near-tie in the reference
(runs.NEAR_TIE), and the whole curve must stay within runs.DRIFT. The overlapped EP exchange and
TP collectives (ep2ov, tp2ov) are layouts of their own here (set per run by the driver). A
single-GPU run that replays EP=2's routing must match EP=2's whole curve to rounding: the exchange
is exact wherever routing is the same. bf16: the whole curve within bf16 rounding. The distributed
optimizer's checkpoint, saved at one layout, resumes at another and continues the single-GPU curve.

The suite starts its processes once per world size (tests/multigpu/driver.py runs every trainer
run of that size in the same processes): one launch of 4 processes with 4 GPUs, then one of 2,
then one of 1 (a resume goes from a larger or equal world to a smaller one); on the 2-GPU H200
the whole suite takes ~4 minutes (each trainer run 3-20 s).
Skipped without GPUs (CI has none); `MEGAMOE_MULTIGPU_ON_CPU=2` (or 4) runs the part of up to 2
(4) processes on the CPU with gloo instead, fp32 only and without the distributed optimizer
(a smoke test of the suite and of the layouts' parallel code; 4: about 3 minutes on 2 cores).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.multigpu import routing_probe
from tests.multigpu import runs as R

pytestmark = [pytest.mark.multigpu, pytest.mark.gpu]
ON_CPU = int(os.environ.get("MEGAMOE_MULTIGPU_ON_CPU", "0"))
# MEGAMOE_MULTIGPU_LAYOUTS=ep2ov,tp2ov: only these layouts (and the resumes between them)
ONLY = set(filter(None, os.environ.get("MEGAMOE_MULTIGPU_LAYOUTS", "").split(",")))
GPUS = ON_CPU or (torch.cuda.device_count() if torch.cuda.is_available() else 0)
STEPS, LR = 20, 1e-3
BF16 = 3e-2  # bf16, the whole curve (fp32: runs.check_fp32)

# (name, TP, PP, EP, GPUs)
LAYOUTS = [
    ("ep2", 1, 1, 2, 2),
    ("tp2", 2, 1, 1, 2),
    ("pp2", 1, 2, 1, 2),
    ("dp2", 1, 1, 1, 2),
    ("ep2ov", 1, 1, 2, 2),
    ("tp2ov", 2, 1, 1, 2),
    ("ep4", 1, 1, 4, 4),
    ("ep2dp2", 1, 1, 2, 4),
    ("tp2ep2", 2, 1, 2, 4),
    ("tp2pp2", 2, 2, 1, 4),
]
# the communication overlaps (the trainer's --ep_overlap_chunks / --tp_comm_overlap), off in the
# other layouts
OVERLAP = {"ep2ov": {"ep_chunks": 2}, "tp2ov": {"tp_comm": True}}
SINGLE = ("single", 1, 1, 1, 1)
BY_NAME = {lay[0]: lay for lay in LAYOUTS + [SINGLE]}
RESUMES = [
    ("single", "single"),
    ("ep2", "tp2"),
    ("tp2", "single"),
    ("dp2", "pp2"),
    # 4 processes: down to 1 and 2, and between 4-process layouts
    ("ep4", "single"),
    ("tp2ep2", "ep2"),
    ("ep2dp2", "tp2pp2"),
]


def _needs(n, *names):
    if ONLY and not all(name in ONLY | {"single"} for name in names):
        return pytest.mark.skip(reason="not in MEGAMOE_MULTIGPU_LAYOUTS")
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA GPUs, found {GPUS}")


def _wanted(*names):
    return not ONLY or all(name in ONLY | {"single"} for name in names)


def plan(root, data, pre, gpus) -> list:
    """Every run of the suite that fits `gpus`, in an order that respects what each needs."""

    def run(name, layout, **kw):
        return R.spec(root, data, pre, name, layout, STEPS, LR, **kw)

    runs = []
    for lay in [SINGLE] + LAYOUTS:
        for precision in (
            ("fp32",) if ON_CPU else ("fp32", "bf16")
        ):  # CPU bf16 is autocast: not this
            if lay[-1] <= gpus and _wanted(lay[0]):
                runs.append(
                    run(
                        f"{lay[0]}-{precision}",
                        lay,
                        precision=precision,
                        overlap=OVERLAP.get(lay[0]),
                    )
                )
    if gpus >= 2 and _wanted("ep2"):
        runs.append(run("single-replays-ep2", SINGLE, replay=os.path.join(root, "ep2-fp32")))
    half = STEPS // 2
    dist_opt = "false" if ON_CPU else "true"  # megatron-core's distributed optimizer needs CUDA
    for first, second in RESUMES:
        # runs.launch_all starts the largest world first
        assert BY_NAME[second][-1] <= BY_NAME[first][-1], (first, second)
        if max(BY_NAME[first][-1], BY_NAME[second][-1]) > gpus or not _wanted(first, second):
            continue
        out = os.path.join(root, f"resume-{first}-{second}")
        # the schedule must be that of a 20-step run: ask for 20, stop after saving at 10
        runs.append(
            run(
                f"resume-{first}-{second}/1",
                BY_NAME[first],
                out=out,
                tag="leg1",
                save_steps=half,
                exit_interval=half,
                use_distributed_optimizer=dist_opt,
            )
        )
        runs.append(
            run(
                f"resume-{first}-{second}/2",
                BY_NAME[second],
                out=out,
                tag="leg2",
                step_offset=half,
                use_distributed_optimizer=dist_opt,
            )
        )
    return runs


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    if GPUS < 1:
        pytest.skip("needs a CUDA GPU (or MEGAMOE_MULTIGPU_ON_CPU=2)")
    root = str(tmp_path_factory.mktemp("multigpu"))
    data, pre = R.setup(root, cpu=bool(ON_CPU))
    runs = plan(root, data, pre, GPUS)
    status, log = R.launch_all(runs, root, cpu=bool(ON_CPU))
    return {r["name"]: r for r in runs}, status, log


def _result(suite, name):
    runs, status, log = suite
    run = runs[name]
    rec = status.get(name)
    assert rec is not None and rec["code"] == 0, (
        f"{name}: {'exit ' + str(rec['code']) if rec else 'did not run'}\n{log[run['world']][2]}"
    )
    return run


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "name,tp,pp,ep,gpus",
    [pytest.param(*lay, marks=_needs(lay[-1], lay[0])) for lay in LAYOUTS],
    ids=[lay[0] for lay in LAYOUTS],
)
def test_layout_matches_single_gpu(suite, name, tp, pp, ep, gpus, precision):
    if ON_CPU and precision == "bf16":
        pytest.skip("bf16 on CPU is autocast, not what this checks")
    got = _result(suite, f"{name}-{precision}")["out"]
    ref = _result(suite, f"single-{precision}")["out"]
    if precision == "fp32":
        R.check_fp32(name, got, ref)
    else:
        a, b = R.losses(got), R.losses(ref)
        err = R.worst_rel(a, b)
        print(f"{name} bf16: worst relative loss difference over {STEPS} steps {err:.2e}")
        assert sum(b[-5:]) < sum(b[:5]) and err < BF16, (name, err, a, b)


@_needs(2, "ep2")
def test_replayed_routing_is_exact(suite):
    """One GPU replaying EP=2's routing: no flips, so the whole curve equals EP=2's to rounding."""
    got = _result(suite, "single-replays-ep2")["out"]
    ref = _result(suite, "ep2-fp32")["out"]
    a, b = R.losses(got), R.losses(ref)
    cmp = routing_probe.compare(R.routes(ref), R.routes(got))
    err = R.worst_rel(a, b)
    print(
        f"single GPU replaying EP=2's routing: worst relative loss difference {err:.2e} over {STEPS} steps, "
        f"{sum(cmp['flips'].values())} flips"
    )
    assert cmp["first"] is None and not cmp["missing"]
    assert err < R.EXACT, (err, a, b)


@pytest.mark.parametrize(
    "first,second",
    [
        pytest.param(a, b, marks=_needs(max(BY_NAME[a][-1], BY_NAME[b][-1]), a, b))
        for a, b in RESUMES
    ],
    ids=[f"{a}->{b}" for a, b in RESUMES],
)
def test_resume_at_another_layout(suite, first, second):
    """The distributed optimizer saved at step 10 in one layout, resumed to step 20 in another:
    the curve continues the single-GPU one (fp32)."""
    _result(suite, f"resume-{first}-{second}/1")
    out = _result(suite, f"resume-{first}-{second}/2")["out"]
    assert len(R.losses(out)) == STEPS
    R.check_fp32(f"{first} -> {second}", out, _result(suite, "single-fp32")["out"])


def test_suite_timing(suite):
    """Not a check: prints each run's time (the suite must fit one 8-minute device call)."""
    runs, status, log = suite
    for world, (code, seconds, _) in sorted(log.items()):
        print(f"launch of {world} process(es): {seconds:.0f} s, exit {code}")
    for name, rec in status.items():
        print(f"  {name}: {rec['seconds']} s")
    assert all(code == 0 for code, _, _ in log.values()), {w: v[2] for w, v in log.items() if v[0]}
