"""Finding and streaming jsonl inputs (.jsonl, .json, .jsonl.gz, .jsonl.zst)."""

from __future__ import annotations

import glob
import gzip
import io
import os

EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")


def input_files(specs) -> list[str]:
    """Each spec is a file, a folder (searched recursively, sorted) or a glob pattern."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        if os.path.isfile(spec):
            out.append(spec)
        elif os.path.isdir(spec):
            found = [
                os.path.join(root, f)
                for root, _, files in os.walk(spec)
                for f in files
                if f.endswith(EXTENSIONS) and not f.startswith(".")
            ]
            out.extend(sorted(found))
        else:
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no input files match {spec}")
            out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no .jsonl/.jsonl.gz/.jsonl.zst files in {list(specs)}")
    return out


def open_binary(path: str):
    """A binary line-iterable stream, decompressing .gz and (if zstandard is installed) .zst."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise RuntimeError(
                f"{path}: reading .zst needs the 'zstandard' package (pip install zstandard)"
            ) from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def iter_lines(path: str):
    """(line number from 1, raw bytes line) for every line of the file."""
    with open_binary(path) as f:
        yield from enumerate(f, 1)
