"""Expert construction methods (numpy / torch only) and split files."""

import json

import numpy as np
import pytest
import torch

from megamoe.moefy import io as split_io
from megamoe.moefy.clustering import balanced_assign, balanced_kmeans, clustering_split
from megamoe.moefy.gradient import gradient_split
from megamoe.moefy.graph import CoactivationCounter, _objective, graph_split, refine_partition
from megamoe.moefy.split import SplitError, random_split, validate_split


def _same_partition(split, groups):
    """split equals the planted groups up to expert order."""
    return sorted(tuple(s.tolist()) for s in split) == sorted(tuple(sorted(g)) for g in groups)


def test_random_split_partitions_and_is_seeded():
    s = random_split(96, 4, seed=3)
    validate_split(s, 96, 4, partition=True)
    assert [len(x) for x in s] == [24] * 4
    assert all(np.array_equal(a, b) for a, b in zip(s, random_split(96, 4, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(s, random_split(96, 4, seed=4)))
    u = random_split(96, 3, seed=0, sizes=[10, 50, 36])
    assert [len(x) for x in u] == [10, 50, 36]
    validate_split(u, 96, 3, partition=True)


def test_random_split_rejects():
    with pytest.raises(SplitError, match="not divisible by --num-experts 5"):
        random_split(96, 5, 0)
    with pytest.raises(SplitError, match="sum to 95"):
        random_split(96, 2, 0, sizes=[40, 55])


def test_balanced_assign_respects_capacities():
    rng = np.random.default_rng(0)
    d = rng.random((50, 4))
    labels = balanced_assign(d, [5, 20, 10, 15])
    assert np.bincount(labels, minlength=4).tolist() == [5, 20, 10, 15]
    # unconstrained-optimal when capacities allow it
    d2 = np.eye(4)[np.repeat(np.arange(4), 3)] * -1.0
    assert balanced_assign(d2, [3] * 4).tolist() == np.repeat(np.arange(4), 3).tolist()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_clustering_recovers_planted_groups(metric):
    """Rows of up_proj drawn around 4 directions (shuffled): the balanced k-means split puts each
    group into one expert."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 64))
    perm = rng.permutation(96)
    groups = [perm[24 * j : 24 * (j + 1)] for j in range(4)]
    w = np.zeros((96, 64))
    for j, g in enumerate(groups):
        w[g] = centers[j] * rng.uniform(0.5, 3.0, size=(24, 1)) + 0.1 * rng.normal(size=(24, 64))
    split = clustering_split(torch.tensor(w, dtype=torch.float32), 4, metric, seed=0)
    assert _same_partition(split, groups)
    assert [
        len(s) for s in clustering_split(torch.tensor(w), 4, metric, 7, sizes=[20, 28, 24, 24])
    ] == [20, 28, 24, 24]


def test_balanced_kmeans_equal_sizes_on_unbalanced_data():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, (80, 8)), rng.normal(10, 1, (16, 8))])
    labels = balanced_kmeans(x, [24] * 4, "l2", seed=0)
    assert np.bincount(labels).tolist() == [24] * 4


def _planted_graph(n=96, k=4, p_in=0.6, p_out=0.05, seed=0):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    lab = np.empty(n, int)
    for j in range(k):
        lab[perm[j * n // k : (j + 1) * n // k]] = j
    same = lab[:, None] == lab[None, :]
    a = np.where(same, p_in, p_out) * rng.uniform(0.5, 1.5, (n, n))
    a = np.triu(a, 1)
    return a + a.T, [np.flatnonzero(lab == j) for j in range(k)]


def test_graph_partition_recovers_planted_blocks():
    a, groups = _planted_graph()
    assert _same_partition(graph_split(a, 4, seed=0), groups)


def test_graph_refinement_improves_and_keeps_sizes():
    a, groups = _planted_graph(seed=3)
    start = np.random.default_rng(0).permutation(np.repeat(np.arange(4), 24))
    refined = refine_partition(a, start, 4, rounds=20)
    assert np.bincount(refined).tolist() == [24] * 4
    assert _objective(a, refined, 4) > _objective(a, start, 4)


def test_graph_split_unequal_sizes_and_threshold():
    a, _ = _planted_graph(seed=4)
    s = graph_split(a, 3, seed=1, sizes=[30, 30, 36], threshold=0.1)
    validate_split(s, 96, 3, partition=True)
    assert [len(x) for x in s] == [30, 30, 36]


def test_coactivation_counter_matches_direct_count():
    torch.manual_seed(0)
    h = torch.randn(3, 50, 40)  # [s, b, d_ff]
    c = CoactivationCounter(40, active_fraction=0.25)
    c.add(h[:, :20])
    c.add(h[:, 20:])
    flat = h.reshape(-1, 40).abs()
    top = flat.topk(10, dim=1).indices
    b = torch.zeros_like(flat).scatter_(1, top, 1.0).double()
    want = (b.T @ b) / flat.shape[0]
    want.fill_diagonal_(0)
    assert c.tokens == 150
    assert np.array_equal(c.matrix(chunk_tokens=37), want.numpy())


def test_gradient_non_sharing_partitions_by_preference():
    rng = np.random.default_rng(0)
    scores = rng.random((4, 96))
    favourite = rng.permutation(96).reshape(4, 24)
    for j in range(4):
        scores[j, favourite[j]] += 10.0  # each expert clearly prefers its own 24 neurons
    s = gradient_split(scores, "non-sharing")
    validate_split(s, 96, 4, partition=True)
    assert all(np.array_equal(s[j], np.sort(favourite[j])) for j in range(4))
    u = gradient_split(scores, "non-sharing", sizes=[12, 36, 24, 24])
    validate_split(u, 96, 4, partition=True)
    assert [len(x) for x in u] == [12, 36, 24, 24]


def test_gradient_sharing_inner_overlaps():
    """Every expert's important neurons are the same 30: sharing-inner gives them to all
    experts (overlap), non-sharing hands each neuron to one expert."""
    rng = np.random.default_rng(1)
    scores = rng.random((4, 96))
    scores[:, :30] += 5.0
    s = gradient_split(scores, "sharing-inner", sizes=[40, 40, 30, 50])
    assert [len(x) for x in s] == [40, 40, 30, 50]
    for x in s:
        assert set(range(30)) <= set(x.tolist())
    validate_split(s, 96, 4)  # valid, but not a partition
    with pytest.raises(SplitError, match="partition"):
        validate_split(s, 96, 4, partition=True)
    # sharing-inner sizes may exceed d_ff / E in total
    gradient_split(scores, "sharing-inner", sizes=[96, 96, 96, 96])
    with pytest.raises(SplitError, match="exceeds"):
        gradient_split(scores, "sharing-inner", sizes=[97, 1, 1, 1])
    with pytest.raises(SplitError, match="gradient-variant"):
        gradient_split(scores, "sharing")


def test_split_files_round_trip_and_are_readable(tmp_path):
    splits = [random_split(96, 4, i) for i in range(2)]
    for i, s in enumerate(splits):
        split_io.write_split(tmp_path / "split", i, s, 96, method="random", seed=i)
    text = (tmp_path / "split" / "layer_1.json").read_text()
    expert_lines = [ln for ln in text.splitlines() if ln.strip().startswith("[")]
    assert len(expert_lines) == 4  # one line per expert
    assert json.loads(text)["sizes"] == [24] * 4 and json.loads(text)["seed"] == 1
    back, infos = split_io.read_splits(tmp_path, 2, 96)  # the parent of split/ works too
    assert infos[0]["method"] == "random"
    for a, b in zip(splits, back):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_split_files_reject_bad_input(tmp_path):
    d = tmp_path / "split"
    for i in range(2):
        split_io.write_split(d, i, random_split(96, 4, i), 96)
    with pytest.raises(SplitError, match="made for intermediate_size 96"):
        split_io.read_splits(d, 2, 128)
    with pytest.raises(SplitError, match="layer_2.json is missing"):
        split_io.read_splits(d, 3, 96)
    with pytest.raises(SplitError, match="beyond the model's 1 layers"):
        split_io.read_splits(d, 1, 96)
    with pytest.raises(SplitError, match="2 experts, expected 4"):
        split_io.write_split(d, 1, [np.arange(48), np.arange(48, 96)], 96)
        split_io.read_splits(d, 2, 96, num_experts=4)
    (d / "layer_1.json").write_text('{"experts": [[0, 1]]}')
    with pytest.raises(SplitError, match="1 experts, expected 4"):  # layers must agree on E
        split_io.read_splits(d, 2, 96)
    (d / "layer_1.json").write_text('{"experts": [[0, 0, 1], [2], [3], [4]]}')
    with pytest.raises(SplitError, match="lists a neuron twice"):
        split_io.read_splits(d, 2, 96)
    (d / "layer_1.json").write_text('{"experts": [[0, 96], [2], [3], [4]]}')
    with pytest.raises(SplitError, match=r"outside \[0, 96\)"):
        split_io.read_splits(d, 2, 96)
    (d / "layer_1.json").write_text("not json")
    with pytest.raises(SplitError, match="layer_1.json is not a split file"):
        split_io.read_splits(d, 2, 96)
    with pytest.raises(SplitError, match="no such directory"):
        split_io.read_splits(tmp_path / "nope", 2, 96)


def test_orthogonal_iteration_matches_eigh():
    """The large-d_ff path (orthogonal iteration) spans the same top eigenvectors as eigh."""
    from megamoe.moefy.graph import _top_eigenvectors

    a, _ = _planted_graph(n=120, k=4, seed=6)
    inv = 1 / np.sqrt(a.sum(1))
    norm = a * inv[:, None] * inv[None, :]
    full = _top_eigenvectors(norm, 4, seed=0)
    it = _top_eigenvectors(norm, 4, seed=0, dense_limit=0)
    proj = lambda v: v @ np.linalg.pinv(v)  # noqa: E731
    assert np.abs(proj(full) - proj(it)).max() < 1e-6
