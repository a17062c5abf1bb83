"""Trainer runs at several layouts, started once per world size, and the flip-aware comparison of
their fp32 loss curves (used by tests/multigpu on GPUs and tests/distributed on CPU).

fp32 comparison (:func:`check_fp32`): a top-k gate turns rounding differences between layouts
into different routing when a token's k-th and (k+1)-th gate logits nearly tie, and from then on
the runs train different models (routing_probe.py). So a run must equal the reference to fp32
rounding (EXACT) up to the first step whose routing differs, that first difference must be a
near-tie in the reference (NEAR_TIE), and the whole curve must stay within DRIFT.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

from tests.multigpu import routing_probe
from tests.train import fixtures as F

MICRO, GLOBAL = 2, 8  # sequences per micro-batch, per step (all layouts)
EXACT = 5e-6  # fp32, while the routing is the same: rounding
NEAR_TIE = (
    1e-3  # the reference margin (relative) of the tokens routed differently at the first flip
)
DRIFT = 5e-3  # fp32, the whole curve after routing flips (CPU, hidden 256: TP=2 2e-4, EP=2 1.8e-3)


def pretrained_main(path, hidden=128):
    from megamoe import checkpoint, parallel
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.model.llama import build_model

    m = ModelConfig(
        vocab_size=F.VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    e = MoEConfig(num_experts=8, num_selects=2, gate_add_noise=False)
    parallel.initialize(parallel.ParallelLayout(), seed=0)
    checkpoint.save(path, build_model(m, e), checkpoint.make_meta(m, e))


def setup(root, hidden=128, cpu=False):
    """Data and a random pretrained LLaMA-MoE (hidden x 4 layers, 8 experts top-2) under root."""
    data = F.write_domains(os.path.join(root, "data"), n_docs=200, seed=0)
    pre = os.path.join(root, "pre")
    code = (
        f"import sys; sys.path.insert(0, {F.ROOT!r}); from tests.multigpu.runs "
        f"import pretrained_main; pretrained_main({pre!r}, {hidden})"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=F.ROOT,
        env=F.clean_env(CUDA_VISIBLE_DEVICES="" if cpu else "0"),
    )
    return data, pre


def spec(
    root,
    data,
    pre,
    name,
    layout,
    steps,
    lr,
    precision="fp32",
    out=None,
    tag="run",
    step_offset=0,
    replay=None,
    overlap=None,
    **flags,
):
    """One run for driver.py. layout: (name, TP, PP, EP, processes)."""
    _, tp, pp, ep, procs = layout
    dp = procs // (tp * pp)
    ga = GLOBAL // (MICRO * dp)
    opts = dict(
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=2,
        eval_steps=0,
        save_steps=0,
        gate_add_noise="false",
        bf16="true" if precision == "bf16" else "false",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    opts.update(flags)
    overlap = overlap or {}  # the communication overlaps, as the trainer's flags
    if overlap.get("ep_chunks", 1) > 1:
        opts["ep_overlap_chunks"] = overlap["ep_chunks"]
    if overlap.get("tp_comm"):
        opts["tp_comm_overlap"] = "true"
    out = out or os.path.join(root, name)
    return dict(
        name=name,
        world=procs,
        out=out,
        ga=ga,
        tag=tag,
        step_offset=step_offset,
        replay=replay,
        argv=F.train_argv(pre, data, None, out, **opts),
    )


def launch_all(runs, root, cpu=False, timeout=900):
    """Each world size's runs in one torchrun launch, the largest world first: a run resumes or
    replays only runs of its own or a larger world. Returns ({name: status}, {world: (exit
    code, seconds, output tail)})."""
    log = {}
    for world in sorted({r["world"] for r in runs}, reverse=True):
        mine = [r for r in runs if r["world"] == world]
        path = os.path.join(root, f"plan{world}.json")
        json.dump(mine, open(path, "w"))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            os.path.join(F.ROOT, "tests", "multigpu", "driver.py"),
            path,
        ]
        env = F.clean_env(
            NCCL_NVLS_ENABLE="0",
            TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
            NVSHMEM_DISABLE_NVLS="1",
            CUDA_VISIBLE_DEVICES="" if cpu else ",".join(map(str, range(world))),
        )
        t0 = time.time()
        p = subprocess.run(
            cmd, cwd=F.ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        log[world] = (p.returncode, time.time() - t0, p.stdout[-3000:] + "\n" + p.stderr[-6000:])
        print(
            f"launch of {world} process(es): {len(mine)} runs in {time.time() - t0:.0f} s (exit {p.returncode})"
        )
    status = {}
    for path in glob.glob(os.path.join(root, "plan*.json.status")):
        for line in open(path):
            rec = json.loads(line)
            status[rec["name"]] = rec
    return status, log


def losses(out):
    return F.train_losses(out)


def routes(out):
    return routing_probe.load(sorted(glob.glob(os.path.join(out, "route.*.pt"))))


def worst_rel(a, b):
    assert len(a) == len(b), (len(a), len(b))
    return max((abs(x - y) / abs(y) for x, y in zip(a, b)), default=0.0)


def check_fp32(label, got_out, ref_out, trained=True) -> dict:
    """The flip-aware comparison of two fp32 runs (module docstring); returns what it measured."""
    got, ref = losses(got_out), losses(ref_out)
    cmp = routing_probe.compare(routes(ref_out), routes(got_out))
    assert not cmp["missing"], f"{label}: no routing recorded for {cmp['missing'][:5]}"
    first = cmp["first"]
    same = len(ref) if first is None else first  # steps before the first routing difference
    exact, overall = worst_rel(got[:same], ref[:same]), worst_rel(got, ref)
    flips = sum(cmp["flips"].values())
    print(
        f"{label} fp32: worst relative loss difference {exact:.2e} over the {same} steps with the same "
        f"routing; "
        + (
            f"first routing difference at step {first + 1} ({cmp['flips'][first]} tokens, "
            f"reference margin {cmp['first_margin']:.1e}), {flips} token-layer flips "
            f"in all, worst over {len(ref)} steps {overall:.2e}"
            if first is not None
            else "no routing difference"
        )
    )
    assert not trained or sum(ref[-5:]) < sum(ref[:5])  # it trained
    assert exact < EXACT, (label, exact, got, ref)
    if first is not None:
        assert cmp["first_margin"] < NEAR_TIE, (label, cmp)
    assert overall < DRIFT, (label, overall, got, ref)
    return dict(exact=exact, overall=overall, first=first, flips=flips, same=same)
