"""The real trainer at several layouts on CPU (gloo): a run that changes its layout at every resume
continues the single-process loss curve, and the overlapped gradient reduction is exact.

Resume: the real trainer under torchrun: 8 steps in four legs of two, EP=2 -> PP=2 -> TP=2 (+SP) ->
one process, each leg stopping through --exit_interval (which saves) and the next resuming from
that checkpoint: model weights, Adam state (per parameter, the experts' per expert) and the
schedule are resharded at every step. The global batch is the same in every layout (gradient
accumulation 4 / DP), gate noise is off, fp32: the losses must match the uninterrupted
single-process run up to the reduction order. tests/multigpu does the same with the distributed
optimizer on GPUs.
"""

from __future__ import annotations

from tests.train import fixtures as F

STEPS, LEG = 8, 2


def test_resume_at_another_layout_each_leg(tiny, tmp_path):
    ref_out = str(tmp_path / "single")
    F.torchrun_train(tiny, ref_out, max_steps=STEPS)
    ref = F.train_losses(ref_out)
    assert len(ref) == STEPS

    out = str(tmp_path / "changing")
    legs = [dict(ep=2, procs=2), dict(pp=2, procs=2), dict(tp=2, procs=2), dict(procs=1)]
    for i, leg in enumerate(legs):
        F.torchrun_train(tiny, out, max_steps=STEPS, save_steps=LEG, exit_interval=LEG, **leg)
        assert len(F.train_losses(out)) == LEG * (i + 1), (leg, F.train_losses(out))
    got = F.train_losses(out)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    print(
        f"EP=2 -> PP=2 -> TP=2 -> single, two steps each: losses {got}\n"
        f"single process: {ref}\nworst relative difference {worst:.2e}"
    )
    assert worst < 1e-5, (got, ref)


def test_overlap_grad_reduce_is_exact(tiny, tmp_path):
    """DP=2 with gradient accumulation: megatron-core's bucketed, overlapped reduction
    (--overlap_grad_reduce, 5000-parameter buckets: ~20 of them) gives the same losses as the
    one reduction after the backward, to the bit (each element is the same sum of two values)."""
    runs = {}
    for overlap in ("false", "true"):
        out = str(tmp_path / f"overlap-{overlap}")
        F.torchrun_train(
            tiny, out, procs=2, max_steps=4, overlap_grad_reduce=overlap, ddp_bucket_size=5000
        )
        runs[overlap] = F.train_losses(out)
    print(f"DP=2, overlap_grad_reduce false / true: {runs['false']} / {runs['true']}")
    assert len(runs["true"]) == 4 and runs["true"] == runs["false"]
