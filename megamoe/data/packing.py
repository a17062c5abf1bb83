"""One domain's documents, concatenated and cut into blocks of exactly `block_size` tokens.

Files written by Megatron's or our preprocess tool store the documents back to back, so a
domain's token stream is simply its .bin files one after another (sorted by name); block b is
stream[b * block_size : (b + 1) * block_size], read lazily from the memory maps. The tail that
does not fill a block is not used. With `eod_id` set, one EOD token is inserted after every
document (for data preprocessed without --append-eod whose model wants a separator).
"""

from __future__ import annotations

import bisect
import glob
import os

import numpy as np

from .indexed import IndexedDataset, IndexedDatasetError, bin_path

SUFFIX = "_document.idx"


def find_prefixes(folder: str) -> list[str]:
    """Sorted `<folder>/*_document` prefixes that have both a .bin and an .idx."""
    out = []
    for idx in sorted(glob.glob(os.path.join(glob.escape(folder), "*" + SUFFIX))):
        prefix = idx[: -len(".idx")]
        if not os.path.isfile(prefix + ".bin"):
            raise IndexedDatasetError(f"{idx}: the matching data file {prefix}.bin is missing")
        out.append(prefix)
    return out


class _File:
    """One indexed dataset as a segment of the domain stream.

    Without EOD insertion a range of the stream is a slice of the memory-mapped .bin. With it,
    document i occupies virtual positions [start_i + i, start_i + i + len_i] (its tokens, then
    one EOD); the document holding a position is found by binary search over the memory-mapped
    index, so nothing proportional to the number of documents is loaded into memory.
    Contiguous storage of the sequences is assumed (all Megatron-style writers do this; the
    reader already checked that the .bin size matches the index).

    Tokens are read with pread rather than through the memory map: blocks are read in random
    order, and a page fault on a mapping reads around it by the device's read-ahead (often
    megabytes, e.g. 8 MiB here) for a block of a few KiB.
    """

    def __init__(self, prefix: str, eod_id: int | None):
        self.ds = IndexedDataset(prefix)
        self.tokens = self.ds.tokens
        self.eod_id = eod_id
        self.num_docs = self.ds.num_documents
        self.length = len(self.tokens) + (self.num_docs if eod_id is not None else 0)
        self._fd = os.open(bin_path(prefix), os.O_RDONLY)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def _read_tokens(self, s: int, e: int) -> np.ndarray:
        """tokens[s:e] of the .bin as int64."""
        item = self.ds.dtype.itemsize
        buf = os.pread(self._fd, (e - s) * item, s * item)
        if len(buf) != (e - s) * item:
            raise IndexedDatasetError(
                f"{bin_path(self.ds.prefix)}: short read at token {s} "
                "(the file shrank after it was opened?)"
            )
        return np.frombuffer(buf, self.ds.dtype).astype(np.int64)

    def _doc_start(self, i: int) -> int:
        """Token offset of document i in .bin (i == num_docs gives the end)."""
        seq = int(self.ds.document_indices[i])
        if seq == len(self.ds):
            return len(self.tokens)
        return int(self.ds.sequence_pointers[seq]) // self.ds.dtype.itemsize

    def read(self, s: int, e: int) -> np.ndarray:
        if self.eod_id is None:
            return self._read_tokens(s, e)
        # last document whose virtual start is <= s
        i = bisect.bisect_right(range(self.num_docs), s, key=lambda k: self._doc_start(k) + k) - 1
        out, p = [], s
        while p < e:
            start, end = self._doc_start(i), self._doc_start(i + 1)
            off = p - (start + i)
            if off < end - start:  # inside document i's tokens
                take = min(end - start - off, e - p)
                out.append(self._read_tokens(start + off, start + off + take))
                p += take
            else:  # the EOD after document i
                out.append(np.array([self.eod_id], np.int64))
                p += 1
                i += 1
        return np.concatenate(out)


class DomainStream:
    """Blocks of one domain over one or more indexed datasets."""

    def __init__(self, name: str, prefixes: list[str], block_size: int, eod_id: int | None = None):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        if not prefixes:
            raise ValueError(f"domain {name!r} has no *_document.bin/.idx datasets")
        self.name, self.prefixes, self.block_size = name, list(prefixes), int(block_size)
        self.files = [_File(p, eod_id) for p in self.prefixes]
        self.bounds = np.cumsum([0] + [f.length for f in self.files])
        self.num_tokens = int(self.bounds[-1])
        self.num_blocks = self.num_tokens // self.block_size
        if self.num_blocks == 0:
            raise ValueError(
                f"domain {name!r} is empty or too small: {self.num_tokens} tokens "
                f"in {self.prefixes}, fewer than one block of {block_size}"
            )

    def block(self, b: int) -> np.ndarray:
        """Tokens of block b as int64 [block_size]."""
        if not 0 <= b < self.num_blocks:
            raise IndexError(
                f"block {b} out of range for domain {self.name!r} ({self.num_blocks} blocks)"
            )
        return self._read(b * self.block_size, (b + 1) * self.block_size)

    def blocks(self, lo: int, hi: int) -> np.ndarray:
        """Blocks lo .. hi-1 as int64 [hi - lo, block_size], read in one pass (validation)."""
        if not 0 <= lo <= hi <= self.num_blocks:
            raise IndexError(
                f"blocks {lo}..{hi} out of range for domain {self.name!r} "
                f"({self.num_blocks} blocks)"
            )
        if lo == hi:
            return np.zeros((0, self.block_size), np.int64)
        return self._read(lo * self.block_size, hi * self.block_size).reshape(-1, self.block_size)

    def _read(self, s: int, e: int) -> np.ndarray:
        """Stream tokens [s, e) as int64."""
        f = int(np.searchsorted(self.bounds, s, side="right")) - 1
        parts = []
        while s < e:  # a range may span the end of one file and the start of the next
            lo = int(self.bounds[f])
            take = min(e, int(self.bounds[f + 1]))
            parts.append(self.files[f].read(s - lo, take - lo))
            s, f = take, f + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
