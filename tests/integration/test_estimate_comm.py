"""megamoe estimate's data-parallel communication model (megamoe/ops/estimate.py, DPComm): the
gradient reduce-scatter and parameter all-gather of megatron-core's distributed optimizer over
the data-parallel and expert-data-parallel rings, limited by the inter-node link of a group that
spans nodes, with and without --overlap_grad_reduce. Numbers worked out by hand."""

from pathlib import Path

import pytest

from megamoe.cli import main
from megamoe.ops.estimate import DPComm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_112 = (
    ROOT
    / "scripts"
    / "cpt"
    / "dynamic_data_selection"
    / "baseline_112gpus_sheared_llama_portion_fluency.sh"
)


def test_dense_over_two_nodes():
    # DP 16 over 2 nodes of 8: all 8 GPUs of a node in the group, so the node's 100 GB/s
    # (below NVLink's 300) carries each ring; 15/16 of 4 GB fp32 gradients, of 2 GB bf16 weights
    c = DPComm(1e9, 0, 2, 8, inter_node_bandwidth=100, intra_node_bandwidth=300)
    rs, ag = c.collectives()
    assert (rs.kind, rs.ranks, rs.nodes, ag.kind) == ("reduce-scatter", 16, 2, "all-gather")
    assert rs.seconds == pytest.approx(15 / 16 * 4e9 / 100e9)
    assert ag.seconds == pytest.approx(15 / 16 * 2e9 / 100e9)
    assert c.exposed(1.2, 1, overlap=False) == pytest.approx(rs.seconds + ag.seconds)
    # overlapped: the backward (0.8 s) hides all but the last of ceil(1e9 / 40M) = 25 buckets
    assert c.buckets() == 25
    assert c.exposed(1.2, 1, overlap=True) == pytest.approx(rs.seconds / 25 + ag.seconds)
    # a short backward (4 micro-batches of 0.03 s: 0.005 s for the last) hides less
    assert c.exposed(0.03, 4, overlap=True) == pytest.approx(
        rs.seconds - 0.03 * 2 / 3 / 4 + ag.seconds
    )


def test_one_node_is_nvlink_and_no_distributed_optimizer_is_an_all_reduce():
    c = DPComm(1e9, 0, 1, 2, intra_node_bandwidth=200)  # DP=2 on one 2-GPU machine
    assert [x.seconds for x in c.collectives()] == pytest.approx(
        [0.5 * 4e9 / 200e9, 0.5 * 2e9 / 200e9]
    )
    plain = DPComm(1e9, 0, 1, 2, intra_node_bandwidth=200, distributed_optimizer=False)
    (ar,) = plain.collectives()
    assert ar.kind == "all-reduce" and ar.seconds == pytest.approx(2 * 0.5 * 4e9 / 200e9)
    assert DPComm(1e9, 0, 1, 1).collectives() == []  # one GPU: nothing to reduce


def test_experts_reduce_over_fewer_ranks_sharing_the_nic():
    # 14 x 8, EP 8: each node holds one expert-parallel group, the expert-data-parallel group is
    # one GPU per node (14 ranks), and the node's 8 such groups share its NICs
    c = DPComm(2e9, 4e9, 14, 8, expert_model_parallel_size=8, inter_node_bandwidth=100)
    by = {x.what: x for x in c.collectives()}
    assert by["dense gradients"].ranks == 112 and by["dense gradients"].bandwidth == 100e9
    e = by["expert gradients"]
    assert (e.ranks, e.nodes, e.nbytes, e.bandwidth) == (14, 14, 4 * 4e9 / 8, 100e9 / 8)
    assert e.seconds == pytest.approx(13 / 14 * 2e9 / 12.5e9)


def test_spanning_nodes_needs_the_inter_node_bandwidth():
    with pytest.raises(ValueError, match="--inter_node_bandwidth"):
        DPComm(1e9, 0, 2, 8).collectives()


def test_cli_for_the_112_gpu_recipe(capsys):
    rc = main(
        [
            "estimate",
            str(SCRIPT_112),
            "--params",
            "6.74B",
            "--expert_params",
            "4.33B",
            "--inter_node_bandwidth",
            "100",
            "--compute_seconds_per_step",
            "30",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    dense_rs = 111 / 112 * 4 * 2.41e9 / 100e9
    assert (
        f"dense gradients: reduce-scatter over 112 ranks on 14 node(s), 9.64 GB fp32 per GPU "
        f"at 100 GB/s -> {dense_rs:.3g} s"
    ) in out
    c = DPComm(2.41e9, 4.33e9, 14, 8, inter_node_bandwidth=100)
    slow, fast = c.exposed(30, 4, False), c.exposed(30, 4, True)
    assert fast < slow
    assert f"without --overlap_grad_reduce: {slow:.3g} s exposed -> {30 + slow:.4g} s/step" in out
    assert f"with --overlap_grad_reduce: {fast:.3g} s exposed -> {30 + fast:.4g} s/step" in out
    assert f"time/step: {30 + slow:g}s" in out  # the script does not overlap
    rc = main(["estimate", str(SCRIPT_112), "--compute_seconds_per_step", "30", "--params", "7B"])
    assert rc == 2 and "--inter_node_bandwidth" in capsys.readouterr().err
