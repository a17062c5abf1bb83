"""Why EP=2 (and TP=2) fp32 loss curves leave the single-process one after some steps: routing
flips on near-ties, not the expert-parallel exchange (CPU, gloo, the real trainer).

The issue's setup (hidden 256, 4 layers, 8 experts top-2, lr 1e-3, global batch 8), 20 steps, on
the 2-core dev VM: EP=2 routes every token like the single process for 6 steps, losses within
9e-7; at step 7 one token whose 2nd and 3rd gate logits were 2.3e-5 apart (relative) takes another
expert, the loss moves by 6.5e-5, the models then differ and more tokens flip (113 token-layer
flips by step 20, losses 1.8e-3 apart). The previous exchange (one row per token-expert copy,
commit c8cc81f) gives the same curve to 1e-7: same flip, same step; TP=2 flips once at step 13
(then 2e-4). Whether and when a flip happens depends on the machine's rounding: on the H200s
EP=2 gave 5.6e-7 with the old exchange and 3.0e-5 with the new one.

This test (12 steps, so another schedule: first flip at step 9 on the dev VM) checks the three
facts that make this the explanation: equal to rounding until the first routing difference, that
difference a near-tie, and a single process replaying EP=2's routing equal to EP=2 to rounding
over the whole run.
"""

from __future__ import annotations

import os

from tests.multigpu import runs as R

STEPS = 12


def test_ep2_differs_only_through_routing_flips(tmp_path):
    root = str(tmp_path)
    data, pre = R.setup(root, hidden=256, cpu=True)
    single, ep2 = ("single", 1, 1, 1, 1), ("ep2", 1, 1, 2, 2)
    runs = [
        R.spec(root, data, pre, "single", single, STEPS, 1e-3),
        R.spec(root, data, pre, "ep2", ep2, STEPS, 1e-3),
        R.spec(root, data, pre, "replay", single, STEPS, 1e-3, replay=os.path.join(root, "ep2")),
    ]
    status, log = R.launch_all(runs, root, cpu=True, timeout=600)
    assert all(status.get(r["name"], {}).get("code") == 0 for r in runs), log
    got = R.check_fp32(
        "ep2", os.path.join(root, "ep2"), os.path.join(root, "single"), trained=False
    )
    # the same routing everywhere: EP=2's whole curve, to rounding
    replay = R.check_fp32(
        "single replaying ep2",
        os.path.join(root, "replay"),
        os.path.join(root, "ep2"),
        trained=False,
    )
    assert replay["first"] is None and replay["exact"] < R.EXACT
    if got["first"] is not None:  # a flip moves the curve by far more than rounding
        assert got["overall"] > 10 * got["exact"], got
