"""Our .bin/.idx reader and writer against megatron-core's own IndexedDataset(Builder)."""

import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset as MCoreDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megamoe.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    optimal_dtype,
)


def _docs(seed, n=50, vocab=60000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 300)) for _ in range(n)]


def _files(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_ours_read_by_megatron_and_byte_identical(tmp_path, dtype):
    docs = _docs(0)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    with IndexedDatasetWriter(ours, dtype) as w:
        for d in docs[:-1]:
            w.add_document(d)
        w.add_document(docs[-1], lengths=[len(docs[-1]) // 2, len(docs[-1]) - len(docs[-1]) // 2])
    b = IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for d in docs[:-1]:
        b.add_document(d, [len(d)])
    b.add_document(docs[-1], [len(docs[-1]) // 2, len(docs[-1]) - len(docs[-1]) // 2])
    b.finalize(theirs + ".idx")
    assert _files(ours) == _files(theirs)

    ds = MCoreDataset(ours)
    assert len(ds) == len(docs) + 1
    assert ds.index.dtype == dtype
    assert list(ds.document_indices) == list(range(len(docs))) + [len(docs) + 1]
    for i, d in enumerate(docs[:-1]):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(np.concatenate([ds[len(docs) - 1], ds[len(docs)]]), docs[-1])


def test_megatron_written_read_by_ours(tmp_path):
    docs = _docs(1)
    prefix = str(tmp_path / "m")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(d, [len(d)])
    b.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == ds.num_documents == len(docs) and ds.dtype == np.uint16
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    ds.check_contiguous()
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    starts = ds.document_token_starts()
    assert starts[-1] == sum(map(len, docs)) and np.all(np.diff(starts) == [len(d) for d in docs])


def test_small_spill_chunks_give_same_bytes(tmp_path):
    """The writer spills lengths/boundaries to disk every `chunk` entries: same bytes."""
    docs = _docs(2, n=40)
    for name, chunk in (("a", 1 << 20), ("b", 3)):
        with IndexedDatasetWriter(str(tmp_path / name), np.int32, chunk=chunk) as w:
            for d in docs[:20]:
                w.add_document(d)
            w.add_documents(np.concatenate(docs[20:]), [len(d) for d in docs[20:]])
    assert _files(str(tmp_path / "a")) == _files(str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path)) == [
        "a.bin",
        "a.idx",
        "a.stats.json",
        "b.bin",
        "b.idx",
        "b.stats.json",
    ]


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in _docs(3, n=10):
            w.add_document(d)
    return prefix


def test_truncated_idx_names_file(good):
    data = open(good + ".idx", "rb").read()
    open(good + ".idx", "wb").write(data[:-5])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*truncated"):
        IndexedDataset(good)
    open(good + ".idx", "wb").write(data[:20])  # cut inside the header
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*truncated"):
        IndexedDataset(good)


def test_foreign_idx_names_file(good):
    open(good + ".idx", "wb").write(b'{"this is": "json, not an index"}\n' * 4)
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*not a Megatron indexed dataset"):
        IndexedDataset(good)


def test_truncated_or_mismatched_bin_names_file(good):
    data = open(good + ".bin", "rb").read()
    open(good + ".bin", "wb").write(data[:-2])
    with pytest.raises(IndexedDatasetError, match=r"good\.bin.*truncated"):
        IndexedDataset(good)
    open(good + ".bin", "wb").write(data + data)
    with pytest.raises(IndexedDatasetError, match=r"good\.bin.*larger"):
        IndexedDataset(good)


def test_missing_bin(good):
    os.unlink(good + ".bin")
    with pytest.raises(FileNotFoundError, match=r"good\.bin"):
        IndexedDataset(good)


def test_failed_write_leaves_existing_dataset_untouched(good, tmp_path):
    before = _files(good)
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(good, np.uint16) as w:
            w.add_document(np.arange(10))
            raise RuntimeError("crash in the middle of a run")
    assert _files(good) == before
    assert sorted(os.listdir(tmp_path)) == [
        "good.bin",
        "good.idx",
        "good.stats.json",
    ]  # no temporaries


def test_token_out_of_dtype_range(tmp_path):
    w = IndexedDatasetWriter(str(tmp_path / "x"), np.uint16)
    with pytest.raises(ValueError, match="70000 does not fit.*uint16"):
        w.add_document(np.array([5, 70000]))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_optimal_dtype_rule():
    assert optimal_dtype(32000) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(128256) == np.int32


def test_writer_memory_does_not_grow_with_input(tmp_path):
    """Lengths and boundaries are spilled every `chunk` documents: 4x the input, same peak."""
    import tracemalloc

    def peak(ndocs):
        doc = np.arange(100, dtype=np.int64)
        tracemalloc.start()
        with IndexedDatasetWriter(str(tmp_path / f"m{ndocs}"), np.uint16, chunk=1000) as w:
            for _ in range(ndocs):
                w.add_document(doc)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, large = peak(5_000), peak(20_000)
    assert large < 1.3 * small, (small, large)
    assert len(IndexedDataset(str(tmp_path / "m20000"))) == 20_000
