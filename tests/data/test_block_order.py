"""BlockOrder: a true permutation for every n, without visible structure, the same in every process.

The statistics are compared with numpy's permutation (which must pass the same thresholds) and
with an identity and a stride order (which must fail them, so the tests can fail).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megamoe.data.order import BlockOrder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRIMES = [3, 5, 7, 11, 13, 31, 97, 101, 257, 7919, 65521, 100_003]
POW2 = sorted({m for k in range(1, 18) for m in (2**k - 1, 2**k, 2**k + 1)})


@pytest.mark.parametrize("key", [(0, 0, 0), (1227, 3, 9)])
def test_every_block_exactly_once(key):
    for n in sorted(set(range(1, 70)) | set(PRIMES) | set(POW2)):
        got = BlockOrder(n, key)(np.arange(n))
        assert got.dtype == np.int64 and got.shape == (n,)
        np.testing.assert_array_equal(np.sort(got), np.arange(n), err_msg=f"n={n}")


def test_scalars_arrays_and_shapes_agree():
    o = BlockOrder(1000, (5, 1, 2))
    full = o(np.arange(1000))
    assert o(17) == full[17] and isinstance(o(17), int)
    np.testing.assert_array_equal(o(np.arange(1000).reshape(10, 100)), full.reshape(10, 100))
    np.testing.assert_array_equal(o(np.array([999, 0, 999], np.int32)), full[[999, 0, 999]])
    assert o(np.zeros(0, np.int64)).shape == (0,)


def test_corpus_sized_domains():
    """Blocks of a 5.1e9-block domain (CommonCrawl at block size 64) and near 2**62: in range,
    distinct, spread over the whole domain, without anything of the domain's size."""
    for n in (5_100_000_007, 2**62 + 1):
        o = BlockOrder(n, (23, 0, 0))
        pos = np.concatenate([np.arange(50_000), n - 1 - np.arange(50_000)])
        got = o(pos)
        assert got.min() >= 0 and got.max() < n and len(np.unique(got)) == len(got)
        assert abs(got.mean() / n - 0.5) < 0.01  # uniform over [0, n): sd 0.29 / sqrt(1e5)


def test_bad_input():
    with pytest.raises(ValueError, match="n >= 1"):
        BlockOrder(0, (1,))
    with pytest.raises(ValueError, match="non-negative"):
        BlockOrder(10, (-1, 0, 0))
    o = BlockOrder(10, (1,))
    with pytest.raises(IndexError, match=r"position out of range \[0, 10\): 10"):
        o(np.arange(11))
    with pytest.raises(IndexError, match="-1"):
        o(-1)
    with pytest.raises(TypeError, match="integers"):
        o(np.array([1.0]))


# ---------------------------------------------------------------- statistical quality


def _z_scores(perm: np.ndarray) -> dict:
    """Standard scores of statistics that are ~N(0, 1) for a uniformly random permutation."""
    n = len(perm)
    p = np.arange(n, dtype=np.float64)
    x = perm.astype(np.float64)
    z = {
        "position/block correlation": np.corrcoef(p, x)[0, 1] * np.sqrt(n),
        "next-position correlation": np.corrcoef(x[:-1], x[1:])[0, 1] * np.sqrt(n),
    }
    # gaps between consecutive blocks (mod n) are ~uniform: chi-square over 64 bins
    gaps = (perm[1:] - perm[:-1]) % n
    obs = np.bincount(gaps * 64 // n, minlength=64)
    chi2 = float(((obs - obs.mean()) ** 2 / obs.mean()).sum())
    z["gap chi-square"] = (chi2 - 63) / np.sqrt(2 * 63)
    # the first 1/16 of an epoch covers the whole domain: chi-square of its blocks in 16 bins
    first = perm[: n // 16]
    obs = np.bincount(first * 16 // n, minlength=16)
    chi2 = float(((obs - obs.mean()) ** 2 / obs.mean()).sum())
    z["early coverage chi-square"] = (chi2 - 15) / np.sqrt(2 * 15)
    # bit i of the position (or of the previous block) says nothing about bit j of the block
    bits = int(n - 1).bit_length()

    def bit_z(a, b):
        A = ((a[:, None] >> np.arange(bits)) & 1).astype(np.float32)
        B = ((b[:, None] >> np.arange(bits)) & 1).astype(np.float32)
        A, B = A - A.mean(0), B - B.mean(0)
        c = (A.T @ B) / np.sqrt(np.outer((A * A).sum(0), (B * B).sum(0)))
        return float(np.abs(c).max() * np.sqrt(len(a)))

    z["max bit correlation, position/block"] = bit_z(np.arange(n), perm)
    z["max bit correlation, block/next block"] = bit_z(perm[:-1], perm[1:])
    return z


# |z| < 5.5: a random permutation exceeds it with probability ~1e-6 per statistic (the bit
# statistics are maxima over <= 17 x 17 correlations: ~1e-5).
LIMIT = 5.5


def _bad(perm):
    return {k: round(v, 2) for k, v in _z_scores(perm).items() if abs(v) >= LIMIT}


@pytest.mark.parametrize("n", [2**16, 100_003])
def test_no_visible_structure(n):
    for key in [(0, 0, 0), (1227, 6, 0), (1227, 6, 1)]:
        assert _bad(BlockOrder(n, key)(np.arange(n))) == {}, f"n={n} key={key}"
    for seed in range(2):  # the baseline passes the same thresholds
        assert _bad(np.random.default_rng(seed).permutation(n)) == {}
    # ... and structured orders do not
    assert len(_bad(np.arange(n))) >= 5
    stride = (np.arange(n) * (int(0.618 * n) | 1) + 12345) % n
    assert np.array_equal(np.sort(stride), np.arange(n))  # a permutation (the stride is coprime)
    assert {"next-position correlation", "gap chi-square"} <= set(_bad(stride))
    # nor does a Feistel network with too few rounds (8 are used; 4 would pass)
    weak = BlockOrder(n, (1227, 0, 0), rounds=3)(np.arange(n))
    assert "max bit correlation, position/block" in _bad(weak)


def test_epochs_domains_and_seeds_give_unrelated_orders():
    n = 100_003
    base = BlockOrder(n, (1227, 2, 0))(np.arange(n))
    for key in [(1227, 2, 1), (1227, 3, 0), (1228, 2, 0), (0, 2, 0)]:
        other = BlockOrder(n, key)(np.arange(n))
        z = np.corrcoef(base, other)[0, 1] * np.sqrt(n)
        same = int((base == other).sum())  # Poisson(1) for independent permutations
        assert abs(z) < LIMIT and same <= 10, (key, z, same)
        # where a block lands in one order says nothing about where it lands in the other
        where_base, where_other = np.argsort(base), np.argsort(other)
        assert abs(np.corrcoef(where_base, where_other)[0, 1] * np.sqrt(n)) < LIMIT


# ---------------------------------------------------------------- determinism

# Fixed forever: changing them changes every run's sample order (and breaks exact resume of
# checkpoints). A new order needs a new name (train_data.ORDER) and its own values here.
GOLDEN = [
    (1000, [0, 0, 0], [719, 44, 226, 141, 771]),
    (5_100_000_007, [1227, 0, 3], [3028450557, 1542608808, 139179229, 2507347836, 280168442]),
]
SAMPLE = [0, 1, 2, 3, 4, 999, 123, 500]


def test_same_order_in_another_process_and_version():
    code = (
        "import json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from megamoe.data.order import BlockOrder\n"
        "pos = [int(p) for p in sys.argv[2:]]\n"
        f"print(json.dumps([BlockOrder(n, k)(pos).tolist() for n, k, _ in {GOLDEN!r}]))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # no dependence on hash randomisation
    out = subprocess.run(
        [sys.executable, "-c", code, ROOT, *map(str, SAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    ).stdout
    here = [BlockOrder(n, k)(np.array(SAMPLE)).tolist() for n, k, _ in GOLDEN]
    assert json.loads(out) == here
    assert [h[:5] for h in here] == [g for _, _, g in GOLDEN]
