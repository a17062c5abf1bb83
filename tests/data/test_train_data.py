"""Packing into blocks, multi-domain batches, epochs, data-parallel sharding and exact resume."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megamoe.data.order import BlockOrder
from megamoe.data.sampler import DomainSampler
from megamoe.data.train_data import MultiDomainTrainData

B = 16  # block size
DOMS = ["alpha", "beta", "gamma"]
FIRST = {"alpha": 0, "beta": 1_000_000, "gamma": 2_000_000}  # token value = domain base + offset


@pytest.fixture
def dataset_dir(tmp_path, helpers):
    """alpha: two datasets (a block spans the file boundary); beta: written by megatron-core;
    gamma: small (6 blocks) so it runs out quickly."""
    d = tmp_path / "train"
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 40, 60).tolist()
    a1 = helpers.write_stream_dataset(d / "alpha" / "part0_text_document", 0, lens[:30])
    helpers.write_stream_dataset(d / "alpha" / "part1_text_document", len(a1), lens[30:])
    os.makedirs(d / "beta")
    b = IndexedDatasetBuilder(str(d / "beta" / "b_content_document.bin"), dtype=np.int32)
    pos = FIRST["beta"]
    for n in rng.integers(1, 50, 40):
        b.add_document(np.arange(pos, pos + n, dtype=np.int32), [int(n)])
        pos += int(n)
    b.finalize(str(d / "beta" / "b_content_document.idx"))
    helpers.write_stream_dataset(d / "gamma" / "g_text_document", FIRST["gamma"], [50, 49, 1])
    return str(d)


def make(dataset_dir, rank=0, size=1, seed=3, rule="none", log=None, **kw):
    s = DomainSampler(
        DOMS,
        [0.5, 0.3, 0.2],
        rule=rule,
        ref_loss={"alpha": 1.0, "beta": 1.0, "gamma": 1.0},
        seed=seed,
    )
    return MultiDomainTrainData(
        dataset_dir, B, s, dp_rank=rank, dp_size=size, seed=seed, log=log or (lambda m: None), **kw
    )


def block_id(row, dom):
    """(domain index, block number) of a returned row; checks the row is a whole block."""
    first = int(row[0]) - FIRST[DOMS[dom]]
    assert first % B == 0
    np.testing.assert_array_equal(row.numpy(), np.arange(first, first + B) + FIRST[DOMS[dom]])
    return dom, first // B


def test_blocks_are_exact_and_each_epoch_covers_every_block_once(dataset_dir):
    logs = []
    data = make(dataset_dir, log=logs.append)
    nb = data.num_blocks
    assert nb == {
        "alpha": sum(np.random.default_rng(0).integers(1, 40, 60).tolist()) // B,
        "beta": data.streams[1].num_tokens // B,
        "gamma": 100 // B,
    }
    seen = {d: [] for d in range(3)}
    for _ in range(40):
        tok, dom = data.next_batch(4)
        assert tok.shape == (4, B) and tok.dtype == torch.int64 and dom.dtype == torch.int64
        for row, d in zip(tok, dom.tolist()):
            seen[d].append(block_id(row, d)[1])
    for d, blocks in seen.items():
        n = nb[DOMS[d]]
        for e in range(len(blocks) // n):  # every full epoch is a permutation of all blocks
            assert sorted(blocks[e * n : (e + 1) * n]) == list(range(n))
    assert len(seen[2]) > 2 * nb["gamma"]  # gamma ran out several times...
    assert seen[2][:6] != seen[2][6:12]  # ...and each epoch has its own order
    assert any(
        "domain gamma exhausted after epoch 0" in m and "starting epoch 1" in m for m in logs
    )
    assert data.epoch[2] >= 2


def test_deterministic_for_a_seed(dataset_dir):
    a, b, c = make(dataset_dir), make(dataset_dir), make(dataset_dir, seed=4)
    xa = [a.next_batch(5) for _ in range(5)]
    xb = [b.next_batch(5) for _ in range(5)]
    xc = [c.next_batch(5) for _ in range(5)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(xa, xb))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(xa, xc))


def test_data_parallel_ranks_take_disjoint_shares(dataset_dir):
    single = make(dataset_dir)
    ranks = [make(dataset_dir, rank=r, size=3) for r in range(3)]
    used = set()
    for _ in range(3):  # 27 samples: no domain is exhausted yet
        tok, dom = single.next_batch(9)
        for r, data in enumerate(ranks):
            t, d = data.next_batch(3)
            assert torch.equal(t, tok[3 * r : 3 * r + 3]) and torch.equal(d, dom[3 * r : 3 * r + 3])
            for row, k in zip(t, d.tolist()):
                key = block_id(row, k)
                assert key not in used  # no two ranks (or steps) see the same sample
                used.add(key)
    states = [json.dumps(r.state_dict(), sort_keys=True) for r in ranks]
    assert states[0] == states[1] == states[2] == json.dumps(single.state_dict(), sort_keys=True)


def test_resume_draws_exactly_the_same_samples(dataset_dir):
    def steps(data, lo, hi):
        out = []
        for i in range(lo, hi):
            out.append(data.next_batch(4))
            if i % 4 == 3:  # a dynamic update between batches, as after an evaluation
                data.sampler.update({"alpha": 1.2, "beta": 0.9, "gamma": 1.0 + 0.1 * i}, step=i)
        return out

    full = steps(make(dataset_dir, rule="sheared_llama"), 0, 30)
    first = make(dataset_dir, rule="sheared_llama")
    part = steps(first, 0, 11)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoint metadata is json
    resumed = make(dataset_dir, rule="sheared_llama")
    resumed.load_state_dict(state)
    part += steps(resumed, 11, 30)
    for (t1, d1), (t2, d2) in zip(full, part):
        assert torch.equal(t1, t2) and torch.equal(d1, d2)
    assert resumed.epoch[2] >= 1  # the resumed part crossed an epoch boundary
    assert len(resumed.sampler.history) == 7


def test_resume_checks_the_data_did_not_change(dataset_dir, helpers):
    data = make(dataset_dir)
    data.next_batch(2)
    state = data.state_dict()
    helpers.write_stream_dataset(
        os.path.join(dataset_dir, "gamma", "g_text_document"), FIRST["gamma"], [200]
    )
    with pytest.raises(ValueError, match="datasets changed"):
        make(dataset_dir).load_state_dict(state)


def test_eod_inserted_between_documents(tmp_path, helpers):
    d = tmp_path / "t"
    rng = np.random.default_rng(5)
    lens = [rng.integers(1, 12, 25).tolist(), rng.integers(1, 12, 30).tolist()]
    expect, first = [], 10
    for k, part in enumerate(lens):  # reference: every document followed by one EOD (2)
        stream = helpers.write_stream_dataset(d / "x" / f"p{k}_text_document", first, part)
        pos = 0
        for n in part:
            expect += stream[pos : pos + n].tolist() + [2]
            pos += n
        first += len(stream)
    data = MultiDomainTrainData(str(d), 7, DomainSampler(["x"], [1.0]), seed=0, eod_id=2)
    st = data.streams[0]
    assert st.num_tokens == len(expect) and st.num_blocks == len(expect) // 7
    got = np.concatenate([st.block(b) for b in range(st.num_blocks)])
    np.testing.assert_array_equal(got, expect[: st.num_blocks * 7])
    np.testing.assert_array_equal(st.blocks(2, st.num_blocks).ravel(), got[14:])  # one read


def test_consecutive_blocks_in_one_read_span_files(dataset_dir):
    alpha = make(dataset_dir).streams[0]
    assert len(alpha.files) == 2
    n = alpha.num_blocks
    np.testing.assert_array_equal(alpha.blocks(0, n), np.stack([alpha.block(b) for b in range(n)]))
    assert alpha.blocks(3, 3).shape == (0, B)
    with pytest.raises(IndexError, match=f"blocks 0..{n + 1} out of range for domain 'alpha'"):
        alpha.blocks(0, n + 1)


def test_domain_weights_must_match_folders(dataset_dir):
    s = DomainSampler(["alpha", "beta", "delta"], [1, 1, 1])
    with pytest.raises(ValueError, match=r"missing \['gamma'\], extra \['delta'\]"):
        MultiDomainTrainData(dataset_dir, B, s)


def test_empty_and_too_small_domains(tmp_path, helpers):
    d = tmp_path / "t"
    helpers.write_stream_dataset(d / "x" / "x_text_document", 0, [100])
    os.makedirs(d / "y")
    s = DomainSampler(["x", "y"], [1, 1])
    with pytest.raises(ValueError, match=r"/y holds no \*_document.bin/.idx.*empty domain"):
        MultiDomainTrainData(str(d), B, s)
    helpers.write_stream_dataset(d / "y" / "y_text_document", 0, [5, 5])
    with pytest.raises(ValueError, match=r"domain 'y' is empty or too small: 10 tokens"):
        MultiDomainTrainData(str(d), B, s)


def test_resume_on_a_different_data_parallel_size(dataset_dir):
    """The state is global (identical on all ranks), so a run may resume on more GPUs."""
    one = make(dataset_dir)
    one.next_batch(6)
    state = json.loads(json.dumps(one.state_dict()))
    expect_tok, expect_dom = one.next_batch(6)
    for r in range(2):
        two = make(dataset_dir, rank=r, size=2)
        two.load_state_dict(state)
        tok, dom = two.next_batch(3)
        assert torch.equal(tok, expect_tok[3 * r : 3 * r + 3])
        assert torch.equal(dom, expect_dom[3 * r : 3 * r + 3])


def global_draws(datas, steps, batch_size):
    """Per step, the global batch's (domain, block) pairs, gathered from all ranks in rank order;
    every rank's state must stay identical."""
    out = []
    for _ in range(steps):
        step = []
        for data in datas:
            tok, dom = data.next_batch(batch_size)
            step += [block_id(row, d) for row, d in zip(tok, dom.tolist())]
        out.append(step)
        states = {json.dumps(d.state_dict(), sort_keys=True) for d in datas}
        assert len(states) == 1
    return out


def resumed(dataset_dir, state, size):
    ranks = [make(dataset_dir, rank=r, size=size) for r in range(size)]
    for r in ranks:
        r.load_state_dict(json.loads(json.dumps(state)))  # checkpoint metadata is json
    return ranks


def test_resume_mid_epoch_at_other_data_parallel_sizes_gives_the_same_global_sequence(dataset_dir):
    """Global batch 12: one rank throughout, versus 4 ranks, resumed on 3, then on 2."""
    expect = global_draws([make(dataset_dir)], 10, 12)
    four = [make(dataset_dir, rank=r, size=4) for r in range(4)]
    got = global_draws(four, 4, 3)
    state = four[0].state_dict()
    n = [four[0].num_blocks[d] for d in DOMS]
    assert any(0 < p < m for p, m in zip(state["position"], n))  # mid-epoch
    three = resumed(dataset_dir, state, 3)
    got += global_draws(three, 3, 4)
    two = resumed(dataset_dir, three[1].state_dict(), 2)
    got += global_draws(two, 3, 6)
    assert got == expect
    assert two[0].epoch[2] >= 3  # gamma (6 blocks) went through several epochs on the way


def test_block_order_is_the_documented_per_position_order(dataset_dir):
    """Position p of epoch e of domain k is block BlockOrder(n, (seed, k, e))(p)."""
    data = make(dataset_dir, seed=3)
    per_domain = {k: [] for k in range(3)}
    for step in global_draws([data], 30, 4):
        for k, b in step:
            per_domain[k].append(b)
    for k, blocks in per_domain.items():
        n = data.num_blocks[DOMS[k]]
        expect = np.concatenate(
            [BlockOrder(n, (3, k, e))(np.arange(n)) for e in range(len(blocks) // n + 1)]
        )
        assert blocks == expect[: len(blocks)].tolist()


def test_old_checkpoint_finishes_its_epoch_in_the_old_order(dataset_dir):
    """A state saved before the per-position order (no "order" key) resumes exactly: a partly
    read epoch goes on in the materialised numpy permutation of that version; the next epoch,
    and every epoch not yet started, uses BlockOrder."""
    old = make(dataset_dir, seed=3)
    global_draws([old], 6, 4)
    state = json.loads(json.dumps(old.state_dict()))
    del state["order"], state["legacy_order_epochs"]  # exactly the former format
    n = [old.num_blocks[d] for d in DOMS]
    assert all(0 < p < m for p, m in zip(state["position"], n))  # every domain mid-epoch
    logs = []
    data = make(dataset_dir, seed=3, log=logs.append)
    data.load_state_dict(state)
    assert any("predates the per-position block order" in m for m in logs)
    draws = global_draws([data], 3, 4)
    mid = data.state_dict()  # saved again during the old epoch: still exact after that resume
    assert mid["legacy_order_epochs"] == {"alpha": 0, "beta": 0, "gamma": 0}
    again = resumed(dataset_dir, mid, 1)
    draws += global_draws(again, 40, 4)
    for k in range(3):
        e, p = state["epoch"][k], state["position"][k]
        # the former code: rng.permutation of arange(n) seeded with (seed, epoch, domain)
        old_order = np.random.default_rng([3, e, k]).permutation(np.arange(n[k], dtype=np.int32))
        got = [b for step in draws for d, b in step if d == k]
        assert len(got) > n[k] - p  # on into the new order
        later = [BlockOrder(n[k], (3, k, e + i))(np.arange(n[k])) for i in range(1, len(got))]
        expect = np.concatenate([old_order[p:]] + later)
        assert got == expect[: len(got)].tolist(), DOMS[k]
    assert again[0].state_dict()["legacy_order_epochs"] == {}  # all old epochs finished
    state["order"] = "something-newer"
    with pytest.raises(ValueError, match="block order 'something-newer'"):
        make(dataset_dir, seed=3).load_state_dict(state)


def test_corpus_sized_domains_start_in_constant_memory(tmp_path, helpers):
    """Two domains of 8.6e9 and 2.1e9 blocks (sparse files; the former order would have
    materialised 72 GiB of permutations): start, batches at 8 data-parallel ranks and a resume
    allocate almost nothing."""
    import tracemalloc

    d = tmp_path / "huge"
    helpers.write_sparse_dataset(d / "cc" / "cc_text_document", [2**31 - 1] * 8)
    helpers.write_sparse_dataset(d / "c4" / "c4_text_document", [2**31 - 1] * 2)

    def build(rank):
        s = DomainSampler(["c4", "cc"], [0.4, 0.6], seed=23)
        return MultiDomainTrainData(
            str(d), 2, s, dp_rank=rank, dp_size=8, seed=23, log=lambda m: None
        )

    tracemalloc.start()
    try:
        data = build(3)
        assert data.num_blocks == {"c4": 2**31 - 1, "cc": 4 * (2**31 - 1)}
        for _ in range(5):
            tok, dom = data.next_batch(64)
        state = data.state_dict()
        other = build(5)
        other.load_state_dict(state)
        other.next_batch(64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        shutil.rmtree(d)  # pytest keeps recent tmp folders: leave no 40 GB (sparse) files there
    assert tok.shape == (64, 2) and int(tok.abs().sum()) == 0  # the sparse files read as zeros
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB allocated"
