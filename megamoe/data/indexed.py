"""Megatron's indexed dataset (.bin/.idx), read and written byte for byte as megatron-core does.

Layout of `<prefix>.idx` (little endian):
    9 bytes  magic b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code of the tokens in .bin (see DTYPE_CODES)
    u64      sequence count N
    u64      document count D (= number of documents + 1)
    int32[N] sequence lengths (tokens)
    int64[N] sequence byte offsets into .bin
    int64[D] document indices: sequence index where each document starts, last entry = N
    (int8[N] sequence modes, only in multimodal files; we read past it, never write it)
`<prefix>.bin` holds the tokens of all sequences back to back.

We keep our own implementation (rather than megatron-core's) so that the writer streams (its
memory does not grow with the input), writes to temporary names renamed at the end, and the
reader gives clear errors that name the file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct

import numpy as np

from ..outputs import process_alive

MAGIC = b"MMIDIDX\x00\x00"
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that cannot be read (truncated, foreign, inconsistent)."""


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def stats_path(prefix: str) -> str:
    """Our record beside a dataset (its largest token id, counts, how it was made); Megatron's
    tools ignore it, and a dataset without one is still read."""
    return prefix + ".stats.json"


def read_stats(prefix: str, dataset: IndexedDataset | None = None) -> dict | None:
    """The stats file of a dataset; None when it has none (made by another tool) or, given the
    opened `dataset`, when its counts are not the dataset's (the .bin/.idx were rewritten since,
    by another tool: the record no longer describes them)."""
    try:
        with open(stats_path(prefix)) as f:
            stats = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise IndexedDatasetError(f"{stats_path(prefix)}: unreadable ({e})") from None
    if dataset is not None and (stats.get("num_sequences"), stats.get("num_documents")) != (
        len(dataset),
        dataset.num_documents,
    ):
        return None
    return stats


_TEMPORARY = re.compile(
    r"^\.(?P<base>.+)\.(bin|len|doc|idx|stats)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$"
)


def remove_dead_temporaries(directory: str, base: str) -> list[str]:
    """Remove the temporaries of `base` that a writer killed before it could clean up left
    (their process no longer runs)."""
    gone = []
    for name in os.listdir(directory):
        m = _TEMPORARY.match(name)
        if m and m.group("base") == base and not process_alive(int(m.group("pid"))):
            os.unlink(os.path.join(directory, name))
            gone.append(name)
    return gone


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def optimal_dtype(vocab_size: int):
    """Megatron's rule: uint16 when every token id fits below 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDataset:
    """Memory-mapped reader. `ds[i]` is sequence i (a read-only numpy view of the .bin)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"indexed dataset file not found: {p}")
        self._read_index(ipath)
        self._map_bin(bpath)

    def _read_index(self, path: str) -> None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(
                f"{path}: not a Megatron indexed dataset index (bad magic {head[:9]!r})"
            )
        if len(head) < HEADER_SIZE:
            raise IndexedDatasetError(f"{path}: truncated index header ({size} bytes)")
        version, code, n, d = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise IndexedDatasetError(f"{path}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{path}: unknown dtype code {code}")
        expected = HEADER_SIZE + 4 * n + 8 * n + 8 * d
        # Multimodal files append one int8 mode per sequence; anything else is damage.
        if size not in (expected, expected + n):
            kind = "truncated" if size < expected else "has trailing bytes"
            raise IndexedDatasetError(
                f"{path}: index {kind}: {size} bytes, expected {expected} "
                f"for {n} sequences and {d} document indices"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx_mmap = np.memmap(path, mode="r", dtype=np.uint8)
        buf = self._idx_mmap
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, np.int32, n, off)
        self.sequence_pointers = np.frombuffer(buf, np.int64, n, off + 4 * n)
        self.document_indices = np.frombuffer(buf, np.int64, d, off + 12 * n)
        if d == 0 or self.document_indices[-1] != n or self.document_indices[0] != 0:
            raise IndexedDatasetError(f"{path}: document indices do not span the {n} sequences")

    def _map_bin(self, path: str) -> None:
        size = os.path.getsize(path)
        n = len(self.sequence_lengths)
        itemsize = self.dtype.itemsize
        need = (
            0
            if n == 0
            else int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        )
        if size != need:
            what = "truncated" if size < need else "larger than its index describes"
            raise IndexedDatasetError(
                f"{path}: data file {what}: {size} bytes, the index {idx_path(self.prefix)} "
                f"describes {need}"
            )
        if size % itemsize:
            raise IndexedDatasetError(f"{path}: size {size} is not a multiple of {itemsize}")
        # An empty file cannot be memory-mapped.
        self._bin_mmap = (
            np.memmap(path, mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._bin_mmap[start : start + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the .bin in order (a memory map): for files written by Megatron's or our
        tools, this is the concatenation of the documents."""
        return self._bin_mmap

    def document_token_starts(self) -> np.ndarray:
        """Token offset of each document in `tokens` (int64, one per document, plus the end)."""
        n, item = len(self), self.dtype.itemsize
        starts = np.zeros(n + 1, np.int64)
        starts[:n] = self.sequence_pointers // item
        if n:
            starts[n] = starts[n - 1] + int(self.sequence_lengths[-1])
        return starts[self.document_indices]

    def check_contiguous(self, chunk: int = 1 << 24) -> None:
        """Raise unless the sequences are stored back to back (what packing relies on)."""
        ptr, lens, item = self.sequence_pointers, self.sequence_lengths, self.dtype.itemsize
        if len(ptr) and ptr[0] != 0:
            raise IndexedDatasetError(f"{idx_path(self.prefix)}: first sequence not at offset 0")
        for s in range(0, max(len(ptr) - 1, 0), chunk):  # chunked: bounded temporary memory
            e = min(s + chunk, len(ptr) - 1)
            if not np.array_equal(ptr[s + 1 : e + 1], ptr[s:e] + lens[s:e].astype(np.int64) * item):
                raise IndexedDatasetError(
                    f"{idx_path(self.prefix)}: sequences are not stored contiguously"
                )


class IndexedDatasetWriter:
    """Streaming writer. Tokens go straight to disk; sequence lengths and document boundaries are
    buffered in small chunks and spilled to temporary side files, so memory stays bounded however
    large the input. Nothing appears under the final names until `finalize()` renames the
    temporary files; `abort()` (or leaving a `with` block by an exception) removes them.
    """

    def __init__(
        self, prefix: str, dtype=np.uint16, chunk: int = 1 << 20, info: dict | None = None
    ):
        self.prefix = prefix
        self.info = dict(info or {})  # how the data was made, for the stats file
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._limit = (
            (np.iinfo(self.dtype).min, np.iinfo(self.dtype).max)
            if self.dtype.kind in "iu"
            else None
        )
        self._chunk = chunk
        d = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(d, exist_ok=True)
        base = os.path.basename(prefix)
        remove_dead_temporaries(d, base)
        # Temporary files live next to the outputs so the final rename stays on one filesystem;
        # created with mode 0o666 so the results get the usual umask permissions.
        tag = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._tmp, self._paths = {}, {}
        for k in ("bin", "len", "doc", "idx", "stats"):
            path = self._paths[k] = os.path.join(d, f".{base}.{k}.{tag}.tmp")
            self._tmp[k] = os.fdopen(
                os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666), "w+b"
            )
        self._lens: list[int] = []
        self._docs: list[int] = []
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token_id = -1  # recorded in the stats file: a start-up check of the vocabulary
        self._closed = False

    def add_document(self, tokens, lengths=None) -> None:
        """One document; `lengths` splits it into several sequences (default: one sequence, or
        none for an empty document)."""
        arr = np.asarray(tokens)
        self._check_range(arr)
        arr = arr.astype(self.dtype, copy=False)
        if lengths is None:
            lengths = [arr.size] if arr.size else []
        lengths = [int(x) for x in lengths]
        if sum(lengths) != arr.size:
            raise ValueError("sequence lengths do not add up to the document size")
        self._tmp["bin"].write(arr.tobytes(order="C"))
        self._lens.extend(lengths)
        self.num_sequences += len(lengths)
        self.num_tokens += arr.size
        self._docs.append(self.num_sequences)
        self.num_documents += 1
        if len(self._lens) >= self._chunk or len(self._docs) >= self._chunk:
            self._spill()

    def add_documents(self, tokens, doc_lengths) -> None:
        """Many documents of one sequence each at once: `tokens` concatenated, `doc_lengths` each
        size (one write and one range check for the lot; what preprocess_data uses). A document
        of length 0 has no sequence: a document boundary alone, as Megatron-LM writes an empty
        document."""
        arr = np.asarray(tokens)
        lengths = np.asarray(doc_lengths, np.int64)
        if int(lengths.sum()) != arr.size:
            raise ValueError("document lengths do not add up to the number of tokens")
        self._check_range(arr)
        self._tmp["bin"].write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        kept = lengths > 0
        self._lens.extend(lengths[kept].tolist())
        self._docs.extend((self.num_sequences + np.cumsum(kept)).tolist())
        self.num_sequences += int(kept.sum())
        self.num_documents += len(lengths)
        self.num_tokens += arr.size
        if len(self._lens) >= self._chunk or len(self._docs) >= self._chunk:
            self._spill()

    def _check_range(self, arr: np.ndarray) -> None:
        if self._limit is not None and arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._limit[0] or hi > self._limit[1]:
                raise ValueError(
                    f"token id {hi if hi > self._limit[1] else lo} does not fit "
                    f"the dataset dtype {self.dtype.name} of {self.prefix}"
                )
            self.max_token_id = max(self.max_token_id, hi)

    def _spill(self) -> None:
        self._tmp["len"].write(np.asarray(self._lens, np.int32).tobytes())
        self._tmp["doc"].write(np.asarray(self._docs, np.int64).tobytes())
        self._lens.clear()
        self._docs.clear()

    def finalize(self) -> None:
        """Write the .idx and move both files to their final names."""
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise

    def _finalize(self) -> None:
        self._spill()
        for k in ("bin", "len", "doc"):
            self._tmp[k].flush()
        n, item = self.num_sequences, self.dtype.itemsize
        out = self._tmp["idx"]
        out.write(MAGIC)
        out.write(struct.pack("<QBQQ", 1, CODE_OF[self.dtype], n, self.num_documents + 1))
        lens = np.memmap(self._paths["len"], np.int32, "r") if n else np.zeros(0, np.int32)
        for s in range(0, n, self._chunk):
            out.write(np.ascontiguousarray(lens[s : s + self._chunk]).tobytes())
        offset = 0  # byte offset of each sequence = running sum of lengths * itemsize
        for s in range(0, n, self._chunk):
            part = lens[s : s + self._chunk].astype(np.int64) * item
            ptr = np.cumsum(part) - part + offset
            out.write(ptr.tobytes())
            offset += int(part.sum())
        out.write(struct.pack("<q", 0))
        docs = (
            np.memmap(self._paths["doc"], np.int64, "r")
            if self.num_documents
            else np.zeros(0, np.int64)
        )
        for s in range(0, len(docs), self._chunk):
            out.write(np.ascontiguousarray(docs[s : s + self._chunk]).tobytes())
        del lens, docs
        self._tmp["stats"].write(json.dumps(self.stats(), indent=1).encode() + b"\n")
        for f in self._tmp.values():
            f.close()
        # Drop an old .idx first: a crash between the renames then leaves no index (an error
        # on read) rather than an old index paired with new data.
        for old in (idx_path(self.prefix), stats_path(self.prefix)):
            if os.path.exists(old):
                os.unlink(old)
        os.replace(self._paths["bin"], bin_path(self.prefix))
        os.replace(self._paths["stats"], stats_path(self.prefix))
        os.replace(self._paths["idx"], idx_path(self.prefix))
        for k in ("len", "doc"):
            os.unlink(self._paths[k])
        self._closed = True

    def stats(self) -> dict:
        """What the stats file records beside the dataset (read back by read_stats)."""
        return {
            "num_documents": self.num_documents,
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "max_token_id": self.max_token_id,
            "dtype": self.dtype.name,
            **self.info,
        }

    def abort(self) -> None:
        """Drop everything written so far; files under the final names are left untouched."""
        if self._closed:
            return
        for k, f in self._tmp.items():
            try:
                f.close()  # flushing may fail again (a full disk): remove the file all the same
            except OSError:
                pass
            if os.path.exists(self._paths[k]):
                os.unlink(self._paths[k])
        self._closed = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
