"""Hugging Face weight files: read .safetensors or .bin (single or sharded with an index json)
one tensor at a time; write sharded safetensors with model.safetensors.index.json.

Reading keeps memory bounded: safetensors files are memory-mapped and each tensor is copied out
on request; .bin shards are loaded with ``torch.load(mmap=True)`` one shard at a time (the last
one is cached, so a layer-by-layer walk through a sharded checkpoint loads each shard about once).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from .hf_config import HFFormatError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Buffers older checkpoints saved that carry no weights (recomputed by every implementation).
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


class HFWeights:
    """Lazy access to the tensors of an HF model directory: ``get(name)``, ``names()``.

    Tracks which names were read, so a converter can refuse weights it would silently drop
    (``unread()``).
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self.weight_map: dict[str, str] = {}  # tensor name -> file name (relative)
        self._read: set[str] = set()
        self._safe_handles: dict[str, object] = {}
        self._bin_cache: tuple[str | None, dict | None] = (None, None)
        self.kind = self._discover()

    def _discover(self) -> str:
        d = self.dir
        for index, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            if (d / index).is_file():
                try:
                    data = json.loads((d / index).read_text())
                    self.weight_map = dict(data["weight_map"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise HFFormatError(
                        f"{d / index}: not a valid index file ({e!r}); it must hold "
                        '{"weight_map": {tensor name: file}}'
                    ) from None
                missing = sorted({f for f in self.weight_map.values() if not (d / f).is_file()})
                if missing:
                    raise HFFormatError(
                        f"{d / index} names shard files that are missing: "
                        f"{missing[:5]}; download them or fix the index"
                    )
                return kind
        if (d / SAFE_SINGLE).is_file():
            return self._map_single(SAFE_SINGLE, "safetensors")
        if (d / BIN_SINGLE).is_file():
            return self._map_single(BIN_SINGLE, "bin")
        safes = sorted(p.name for p in d.glob("*.safetensors"))
        if len(safes) == 1:
            return self._map_single(safes[0], "safetensors")
        raise HFFormatError(
            f"{d}: no weights found: expected {SAFE_SINGLE}, {SAFE_INDEX} (sharded), {BIN_SINGLE} "
            f"or {BIN_INDEX} (sharded)"
            + (f"; found several *.safetensors without an index: {safes[:4]}" if safes else "")
        )

    def _map_single(self, fname: str, kind: str) -> str:
        if kind == "safetensors":
            names = self._safe(fname).keys()
        else:
            names = self._bin(fname).keys()
        self.weight_map = {n: fname for n in names}
        return kind

    def _safe(self, fname: str):
        h = self._safe_handles.get(fname)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(str(self.dir / fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise HFFormatError(
                    f"{self.dir / fname}: cannot read as safetensors ({e})"
                ) from None
            self._safe_handles[fname] = h
        return h

    def _bin(self, fname: str) -> dict:
        cached_name, cached = self._bin_cache
        if cached_name == fname:
            return cached
        self._bin_cache = (None, None)  # drop the previous shard before loading the next
        path = self.dir / fname
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise HFFormatError(f"{path}: cannot read as a PyTorch state dict ({e})") from None
        if not isinstance(sd, dict):
            raise HFFormatError(f"{path}: holds a {type(sd).__name__}, not a state dict")
        self._bin_cache = (fname, sd)
        return sd

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map.get(name)
        if fname is None:
            raise HFFormatError(
                f"{self.dir}: tensor {name!r} not found in the {self.kind} weights "
                f"({len(self.weight_map)} tensors); is this the right model type?"
            )
        self._read.add(name)
        if self.kind == "safetensors":
            try:
                return self._safe(fname).get_tensor(name)
            except HFFormatError:
                raise
            except Exception as e:
                raise HFFormatError(
                    f"{self.dir / fname}: cannot read tensor {name!r} ({e})"
                ) from None
        sd = self._bin(fname)
        if name not in sd:
            raise HFFormatError(
                f"{self.dir / fname}: tensor {name!r} is listed in the index but "
                "missing from the file"
            )
        return sd[name]

    def unread(self) -> list[str]:
        """Names present in the files that were never read (ignoring known non-weight buffers)."""
        return sorted(n for n in self.weight_map if n not in self._read and not IGNORED.match(n))

    def close(self) -> None:
        self._safe_handles.clear()
        self._bin_cache = (None, None)


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (HF's convention: GB = 10^9, GiB = 2^30); an int is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(
            f"--max-shard-size {text!r}: give a size like 5GB, 500MB, 2GiB or a number of bytes"
        )
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return n


class ShardedSafetensorsWriter:
    """Write tensors in order into safetensors shards of at most `max_shard_size` bytes (a single
    larger tensor gets a shard of its own). One shard: ``model.safetensors``; several:
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (HF's layout).
    Holds at most one shard in memory."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB"):
        self.dir = Path(out_dir)
        self.max = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temp file name, tensor names
        self.total_size = 0

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        n = self._nbytes(tensor)
        if self._pending and self._pending_bytes + n > self.max:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += n
        self.total_size += n

    def add_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in items:
            self.add(name, t)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        tmp = f"model-{len(self._shards) + 1:05d}.safetensors.part"
        save_file(self._pending, str(self.dir / tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards, write the index. Returns the file names."""
        self._flush()
        n = len(self._shards)
        if n == 0:
            raise ValueError("no tensors written")
        if n == 1:
            tmp, _ = self._shards[0]
            os.replace(self.dir / tmp, self.dir / SAFE_SINGLE)
            return [SAFE_SINGLE]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp, self.dir / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files + [SAFE_INDEX]
