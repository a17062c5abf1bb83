"""Per-domain validation sets, named after their domain.

`validation_dir` may hold, for each domain, either
    <domain>/*_document.{bin,idx}          (the layout preprocess_data.py --domain-folders writes)
    <domain>_<key>_document.{bin,idx}      (Megatron style: --output-prefix <dir>/<domain>;
                                            the json key must then contain no underscore)
Each domain's documents are concatenated in order (no shuffling) and cut into blocks.
"""

from __future__ import annotations

import os

import torch

from .domains import check_domain_names
from .packing import SUFFIX, DomainStream, find_prefixes


def find_validation_sets(validation_dir: str) -> dict[str, list[str]]:
    if not os.path.isdir(validation_dir):
        raise FileNotFoundError(f"validation directory not found: {validation_dir}")
    found: dict[str, list[str]] = {}
    for name in sorted(os.listdir(validation_dir)):
        path = os.path.join(validation_dir, name)
        if name.startswith("."):
            continue
        if os.path.isdir(path):
            prefixes = find_prefixes(path)
            if prefixes:
                found.setdefault(name, []).extend(prefixes)
        elif name.endswith(SUFFIX):
            stem = name[: -len(SUFFIX)]  # "<domain>_<key>"
            if "_" not in stem:
                raise ValueError(f"{path}: expected <domain>_<key>_document.idx")
            prefix = path[: -len(".idx")]
            if not os.path.isfile(prefix + ".bin"):
                raise FileNotFoundError(f"{path}: the matching data file {prefix}.bin is missing")
            found.setdefault(stem.rsplit("_", 1)[0], []).append(prefix)
    if not found:
        raise ValueError(
            f"{validation_dir} holds no validation sets (<domain>/*_document.idx or "
            "<domain>_<key>_document.idx)"
        )
    return found


def load_validation_sets(
    validation_dir: str,
    block_size: int,
    max_blocks_per_domain: int | None = None,
    domains: list[str] | None = None,
    eod_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """{domain: LongTensor [n, block_size]}: the first n blocks of each domain's validation data.
    With `domains`, the sets found must match those names exactly (and come in that order)."""
    found = find_validation_sets(validation_dir)
    if domains is not None:
        check_domain_names(list(found), list(domains), f"validation sets in {validation_dir}")
    out = {}
    for d in domains if domains is not None else found:
        s = DomainStream(d, found[d], block_size, eod_id)
        n = (
            s.num_blocks
            if max_blocks_per_domain is None
            else min(s.num_blocks, max_blocks_per_domain)
        )
        out[d] = torch.from_numpy(s.blocks(0, n))
    return out
