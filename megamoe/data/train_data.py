"""Multi-domain training batches: the sampler picks a domain per sample, the domain gives a block.

Layout: `dataset_dir/<domain>/*_document.{bin,idx}`, one sub-folder per domain, every dataset
in it used (sorted by name). Each domain is a DomainStream of `block_size`-token blocks, visited
in a shuffled order per epoch (the permutation is derived from (seed, epoch, domain index)).

Data parallelism: every rank draws the same global batch of batch_size * dp_size domain choices
(same sampler, same seed) and advances every domain's position for all of them, so all ranks hold
identical state; rank r then reads only global samples [r * batch_size, (r + 1) * batch_size).
Within an epoch of a domain no block is used twice, so no two ranks see the same sample.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .domains import check_domain_names
from .packing import DomainStream, find_prefixes
from .sampler import DomainSampler


def find_domain_folders(dataset_dir: str) -> dict[str, list[str]]:
    """{domain: [prefixes]} for each sub-folder of dataset_dir (hidden ones skipped)."""
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"dataset directory not found: {dataset_dir}")
    out = {}
    for name in sorted(os.listdir(dataset_dir)):
        path = os.path.join(dataset_dir, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        out[name] = find_prefixes(path)
        if not out[name]:
            raise ValueError(f"domain folder {path} holds no *_document.bin/.idx datasets "
                             "(empty domain)")
    if not out:
        raise ValueError(f"{dataset_dir} has no domain sub-folders with *_document.bin/.idx")
    return out


class MultiDomainTrainData:
    def __init__(self, dataset_dir: str, block_size: int, sampler: DomainSampler,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 eod_id: int | None = None, log=print):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        found = find_domain_folders(dataset_dir)
        check_domain_names(sampler.domains, list(found),
                           f"domain weights (for the domain folders in {dataset_dir})")
        self.domains = list(sampler.domains)
        self.sampler, self.block_size, self.seed = sampler, int(block_size), int(seed)
        self.dp_rank, self.dp_size, self.log = dp_rank, dp_size, log
        self.streams = [DomainStream(d, found[d], block_size, eod_id) for d in self.domains]
        self.epoch = [0] * len(self.domains)
        self.position = [0] * len(self.domains)  # blocks used in the current epoch
        self.consumed_samples = 0  # global samples drawn (all ranks)
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def num_blocks(self) -> dict[str, int]:
        return {d: s.num_blocks for d, s in zip(self.domains, self.streams)}

    def summary(self) -> str:
        w = self.sampler.weights
        rows = [f"  {d:<14} {s.num_tokens:>14,} tokens {s.num_blocks:>11,} blocks  weight {x:.4f}"
                for d, s, x in zip(self.domains, self.streams, w)]
        return f"data: {len(self.domains)} domains, block size {self.block_size}\n" + "\n".join(rows)

    def _order(self, k: int) -> np.ndarray:
        """Block order of domain k's current epoch (one permutation cached per domain)."""
        e = self.epoch[k]
        if k not in self._perm or self._perm[k][0] != e:
            n = self.streams[k].num_blocks
            rng = np.random.default_rng([self.seed, e, k])
            dtype = np.int32 if n < 2**31 else np.int64  # compact: 4 bytes per block
            self._perm[k] = (e, rng.permutation(np.arange(n, dtype=dtype)))
        return self._perm[k][1]

    def _take(self, k: int) -> int:
        """Next block of domain k; starts a new epoch of that domain when it runs out."""
        n = self.streams[k].num_blocks
        if self.position[k] >= n:
            self.log(f"data: domain {self.domains[k]} exhausted after epoch {self.epoch[k]} "
                     f"({n} blocks); starting epoch {self.epoch[k] + 1}")
            self.epoch[k] += 1
            self.position[k] = 0
        b = int(self._order(k)[self.position[k]])
        self.position[k] += 1
        return b

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [batch_size, block_size], domain_ids [batch_size]) for this rank, as int64."""
        doms = self.sampler.sample(batch_size * self.dp_size)
        blocks = [self._take(int(k)) for k in doms]  # every rank advances for all samples
        lo = self.dp_rank * batch_size
        mine = range(lo, lo + batch_size)
        tokens = np.stack([self.streams[doms[j]].block(blocks[j]) for j in mine])
        self.consumed_samples += len(doms)
        return torch.from_numpy(tokens), torch.from_numpy(doms[lo: lo + batch_size].copy())

    def state_dict(self) -> dict:
        """JSON-serialisable; identical on every data-parallel rank."""
        return {"domains": list(self.domains), "block_size": self.block_size, "seed": self.seed,
                "num_blocks": [s.num_blocks for s in self.streams],
                "epoch": list(self.epoch), "position": list(self.position),
                "consumed_samples": self.consumed_samples,
                "sampler": self.sampler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["domains"]) != self.domains:
            raise ValueError(f"data state is for domains {sd['domains']}, not {self.domains}")
        if sd["block_size"] != self.block_size or sd["seed"] != self.seed:
            raise ValueError(f"data state has block_size {sd['block_size']} and seed "
                             f"{sd['seed']}; this run uses {self.block_size} and {self.seed}")
        now = [s.num_blocks for s in self.streams]
        if list(sd["num_blocks"]) != now:
            raise ValueError(f"the datasets changed since the checkpoint: blocks per domain "
                             f"{dict(zip(self.domains, sd['num_blocks']))} then, "
                             f"{dict(zip(self.domains, now))} now")
        self.epoch = [int(x) for x in sd["epoch"]]
        self.position = [int(x) for x in sd["position"]]
        self.consumed_samples = int(sd["consumed_samples"])
        self.sampler.load_state_dict(sd["sampler"])
