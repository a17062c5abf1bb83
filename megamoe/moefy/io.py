"""Split files: one readable JSON file per layer, ``<dir>/layer_<i>.json``.

    {
      "layer": 0,
      "method": "random",
      "num_experts": 4,
      "intermediate_size": 11008,
      "sizes": [2752, 2752, 2752, 2752],
      "experts": [
        [0, 5, 17, ...],          <- one line per expert: its neuron ids (rows of gate/up_proj,
        ...                          columns of down_proj), ascending
      ],
      ... (the method's parameters: seed, metric, ...)
    }

hf-to-megamoe writes them under ``<output>/split/``; ``--split-file`` reads them back (give the
split directory, or a megamoe checkpoint that holds one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .split import SplitError, validate_split

SPLIT_DIR = "split"
# fields write_split derives from the split itself; the rest describe how it was made
STRUCTURE = ("layer", "num_experts", "intermediate_size", "sizes", "experts")


def layer_file(directory: str | os.PathLike, layer: int) -> Path:
    return Path(directory) / f"layer_{layer}.json"


def write_split(
    directory: str | os.PathLike,
    layer: int,
    split: Sequence[np.ndarray],
    intermediate_size: int,
    **info: Any,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head = {
        "layer": layer,
        **info,
        "num_experts": len(split),
        "intermediate_size": intermediate_size,
        "sizes": [int(len(s)) for s in split],
    }
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
    lines.append('  "experts": [')
    for j, ids in enumerate(split):
        sep = "," if j < len(split) - 1 else ""
        lines.append("    " + json.dumps([int(i) for i in ids]) + sep)
    lines += ["  ]", "}", ""]
    path = layer_file(directory, layer)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def read_split(
    path: str | os.PathLike,
    intermediate_size: int | None = None,
    num_experts: int | None = None,
    partition: bool = False,
) -> tuple[list[np.ndarray], dict]:
    """(split, header fields) of one layer file, validated against the model's shapes."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"--split-file: {path} not found")
    try:
        data = json.loads(path.read_text())
        experts = [np.asarray(e, dtype=np.int64) for e in data["experts"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SplitError(
            f"--split-file: {path} is not a split file ({e!r}); expected JSON with "
            'an "experts" list of neuron-id lists'
        ) from None
    d_ff = intermediate_size if intermediate_size is not None else data.get("intermediate_size")
    if intermediate_size is not None and data.get("intermediate_size", d_ff) != intermediate_size:
        raise SplitError(
            f"--split-file: {path} was made for intermediate_size "
            f"{data['intermediate_size']}, the model has {intermediate_size}"
        )
    e = num_experts if num_experts is not None else len(experts)
    experts = validate_split(experts, int(d_ff), e, partition=partition, where=str(path))
    info = {k: v for k, v in data.items() if k not in STRUCTURE}
    return experts, info


def find_split_dir(path: str | os.PathLike) -> Path:
    """A split directory, or a checkpoint directory holding ``split/``."""
    path = Path(path)
    if (path / SPLIT_DIR).is_dir() and not layer_file(path, 0).is_file():
        path = path / SPLIT_DIR
    if not path.is_dir():
        raise SplitError(
            f"--split-file {path}: no such directory (give the split directory "
            "with layer_<i>.json files, or a converted checkpoint that holds one)"
        )
    return path


def read_splits(
    path: str | os.PathLike,
    num_layers: int,
    intermediate_size: int,
    num_experts: int | None = None,
) -> tuple[list[list[np.ndarray]], list[dict]]:
    """Every layer's split from a split directory (or a checkpoint holding split/)."""
    d = find_split_dir(path)
    splits, infos = [], []
    for i in range(num_layers):
        f = layer_file(d, i)
        if not f.is_file():
            raise SplitError(
                f"--split-file {d}: {f.name} is missing; the model has {num_layers} "
                "layers and needs one split file for each"
            )
        s, info = read_split(f, intermediate_size, num_experts)
        if num_experts is None:
            num_experts = len(s)
        splits.append(s)
        infos.append(info)
    extra = sorted(
        p.name
        for p in d.glob("layer_*.json")
        if not p.stem[6:].isdigit() or int(p.stem[6:]) >= num_layers
    )
    if extra:
        raise SplitError(
            f"--split-file {d}: {extra} are beyond the model's {num_layers} layers; "
            "was it made for another model?"
        )
    return splits, infos
