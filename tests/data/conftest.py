"""Shared fixtures for the data tests: a real sentencepiece model trained on a generated corpus,
jsonl writers and small indexed datasets with known contents."""

import json
import os
import random
import struct

import numpy as np
import pytest

from megamoe.data.indexed import IndexedDatasetWriter

WORDS_SEED = 1234


def _words(n=400, seed=WORDS_SEED):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def make_texts(n, seed=0, max_words=60):
    """n random documents of pseudo-words (some with unicode and newlines)."""
    rng = random.Random(seed)
    words = _words()
    out = []
    for i in range(n):
        t = " ".join(rng.choices(words, k=rng.randint(1, max_words)))
        if i % 7 == 3:
            t += "\nzweite Zeile — ünïcödé ✓"
        out.append(t)
    return out


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A LLaMA-like sentencepiece model (unk 0, bos 1, eos 2, no pad) trained in a second."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(make_texts(2000, seed=99)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "tok"),
        vocab_size=400,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        character_coverage=1.0,
    )
    return str(d / "tok.model")


@pytest.fixture(scope="session")
def big_vocab_model(sp_model, tmp_path_factory):
    """The same model with extra pieces up to 70,000 (too many for uint16)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    with open(sp_model, "rb") as f:
        m.ParseFromString(f.read())
    for i in range(70_000 - len(m.pieces)):
        p = m.pieces.add()
        p.piece, p.score, p.type = f"\u2581zz{i}", -1e6, pb.ModelProto.SentencePiece.NORMAL
    path = tmp_path_factory.mktemp("spbig") / "big.model"
    path.write_bytes(m.SerializeToString())
    return str(path)


def write_jsonl(path, records, compress=False):
    """Write dicts (or raw strings, written as given) one per line."""
    import gzip

    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return str(path)


def write_stream_dataset(prefix, first_token, doc_lengths, dtype=np.int32):
    """An indexed dataset whose concatenated tokens are first_token, first_token + 1, ...
    (so every block is identified by its first token). Returns the token stream."""
    stream = np.arange(first_token, first_token + sum(doc_lengths), dtype=np.int64)
    with IndexedDatasetWriter(str(prefix), dtype) as w:
        pos = 0
        for n in doc_lengths:
            w.add_document(stream[pos : pos + n])
            pos += n
    return stream


def write_sparse_dataset(prefix, seq_lengths, dtype=np.uint16):
    """A real .idx (one document per sequence) with a sparse .bin of zeros (no disk used): a
    dataset of any size for tests that must not read the tokens of the whole corpus."""
    from megamoe.data.indexed import CODE_OF, MAGIC

    lens = np.asarray(seq_lengths, np.int32)
    item = np.dtype(dtype).itemsize
    ptr = np.concatenate([[0], np.cumsum(lens[:-1], dtype=np.int64) * item]).astype(np.int64)
    os.makedirs(os.path.dirname(str(prefix)), exist_ok=True)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", 1, CODE_OF[np.dtype(dtype)], len(lens), len(lens) + 1))
        f.write(lens.tobytes() + ptr.tobytes() + np.arange(len(lens) + 1, dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lens.sum(dtype=np.int64)) * item)


@pytest.fixture
def helpers():
    class H:
        pass

    H.make_texts = staticmethod(make_texts)
    H.write_jsonl = staticmethod(write_jsonl)
    H.write_stream_dataset = staticmethod(write_stream_dataset)
    H.write_sparse_dataset = staticmethod(write_sparse_dataset)
    return H
