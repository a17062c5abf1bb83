"""Packing into blocks, multi-domain batches, epochs, data-parallel sharding and exact resume."""
import json
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

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
    s = DomainSampler(DOMS, [0.5, 0.3, 0.2], rule=rule,
                      ref_loss={"alpha": 1.0, "beta": 1.0, "gamma": 1.0}, seed=seed)
    return MultiDomainTrainData(dataset_dir, B, s, dp_rank=rank, dp_size=size, seed=seed,
                                log=log or (lambda m: None), **kw)


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
    assert nb == {"alpha": sum(np.random.default_rng(0).integers(1, 40, 60).tolist()) // B,
                  "beta": data.streams[1].num_tokens // B, "gamma": 100 // B}
    seen = {d: [] for d in range(3)}
    for _ in range(40):
        tok, dom = data.next_batch(4)
        assert tok.shape == (4, B) and tok.dtype == torch.int64 and dom.dtype == torch.int64
        for row, d in zip(tok, dom.tolist()):
            seen[d].append(block_id(row, d)[1])
    for d, blocks in seen.items():
        n = nb[DOMS[d]]
        for e in range(len(blocks) // n):  # every full epoch is a permutation of all blocks
            assert sorted(blocks[e * n:(e + 1) * n]) == list(range(n))
    assert len(seen[2]) > 2 * nb["gamma"]  # gamma ran out several times...
    assert seen[2][:6] != seen[2][6:12]  # ...and each epoch has its own order
    assert any("domain gamma exhausted after epoch 0" in m and "starting epoch 1" in m
               for m in logs)
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
            assert torch.equal(t, tok[3 * r: 3 * r + 3]) and torch.equal(d, dom[3 * r: 3 * r + 3])
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
    helpers.write_stream_dataset(os.path.join(dataset_dir, "gamma", "g_text_document"),
                                 FIRST["gamma"], [200])
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
            expect += stream[pos: pos + n].tolist() + [2]
            pos += n
        first += len(stream)
    data = MultiDomainTrainData(str(d), 7, DomainSampler(["x"], [1.0]), seed=0, eod_id=2)
    st = data.streams[0]
    assert st.num_tokens == len(expect) and st.num_blocks == len(expect) // 7
    got = np.concatenate([st.block(b) for b in range(st.num_blocks)])
    np.testing.assert_array_equal(got, expect[: st.num_blocks * 7])


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
        assert torch.equal(tok, expect_tok[3 * r: 3 * r + 3])
        assert torch.equal(dom, expect_dom[3 * r: 3 * r + 3])
