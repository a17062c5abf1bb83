"""Multi-domain training batches: the sampler picks a domain per sample, the domain gives a block.

Layout: `dataset_dir/<domain>/*_document.{bin,idx}`, one sub-folder per domain, every dataset
in it used (sorted by name). Each domain is a DomainStream of `block_size`-token blocks, visited
in a shuffled order per epoch: position p of epoch e of domain k reads block
BlockOrder(n, (seed, k, e))(p) (order.py), computed per position, so start-up, resume and a new
epoch cost the same at any corpus size. The state is (epoch, position) per domain.

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
from .order import BlockOrder
from .packing import DomainStream, find_prefixes
from .sampler import DomainSampler

# Names the block order in the saved state; a state without it comes from the materialised
# numpy permutation used before (see load_state_dict).
ORDER = "feistel8"


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
            raise ValueError(
                f"domain folder {path} holds no *_document.bin/.idx datasets (empty domain)"
            )
    if not out:
        raise ValueError(f"{dataset_dir} has no domain sub-folders with *_document.bin/.idx")
    return out


class MultiDomainTrainData:
    def __init__(
        self,
        dataset_dir: str,
        block_size: int,
        sampler: DomainSampler,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        eod_id: int | None = None,
        log=print,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        if int(seed) < 0:
            raise ValueError(f"the data order needs a seed >= 0 (--seed), got {seed}")
        found = find_domain_folders(dataset_dir)
        check_domain_names(
            sampler.domains,
            list(found),
            f"domain weights (for the domain folders in {dataset_dir})",
        )
        self.domains = list(sampler.domains)
        self.sampler, self.block_size, self.seed = sampler, int(block_size), int(seed)
        self.dp_rank, self.dp_size, self.log = dp_rank, dp_size, log
        self.streams = [DomainStream(d, found[d], block_size, eod_id) for d in self.domains]
        self.epoch = [0] * len(self.domains)
        self.position = [0] * len(self.domains)  # blocks used in the current epoch
        self.consumed_samples = 0  # global samples drawn (all ranks)
        self._orders: dict[int, tuple[int, object]] = {}  # domain -> (epoch, its order)
        # domain -> epoch still read in the old materialised order (a resumed old checkpoint)
        self._legacy: dict[int, int] = {}

    @property
    def num_blocks(self) -> dict[str, int]:
        return {d: s.num_blocks for d, s in zip(self.domains, self.streams)}

    def summary(self) -> str:
        w = self.sampler.weights
        rows = [
            f"  {d:<14} {s.num_tokens:>14,} tokens {s.num_blocks:>11,} blocks  weight {x:.4f}"
            for d, s, x in zip(self.domains, self.streams, w)
        ]
        return f"data: {len(self.domains)} domains, block size {self.block_size}\n" + "\n".join(
            rows
        )

    def _order(self, k: int, e: int):
        """Block order of epoch e of domain k: positions (int array) -> block numbers."""
        if k not in self._orders or self._orders[k][0] != e:
            n = self.streams[k].num_blocks
            if self._legacy.get(k) == e:
                self._orders[k] = (e, _legacy_permutation(n, self.seed, e, k).__getitem__)
            else:
                self._orders[k] = (e, BlockOrder(n, (self.seed, k, e)))
        return self._orders[k][1]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [batch_size, block_size], domain_ids [batch_size]) for this rank, as int64."""
        doms = self.sampler.sample(batch_size * self.dp_size)
        lo = self.dp_rank * batch_size
        blocks = np.empty(batch_size, np.int64)
        for k in np.unique(doms).tolist():
            idx = np.flatnonzero(doms == k)  # this global batch's samples of domain k, in order
            n = self.streams[k].num_blocks
            # The j-th of them is block number position + j of the domain's epoch stream,
            # continuing into the next epoch(s) past n; every rank advances for all of them.
            g = self.position[k] + np.arange(idx.size, dtype=np.int64)
            epoch, pos = self.epoch[k] + g // n, g % n
            for e in range(self.epoch[k], int(epoch[-1])):
                self.log(
                    f"data: domain {self.domains[k]} exhausted after epoch {e} "
                    f"({n} blocks); starting epoch {e + 1}"
                )
            mine = (idx >= lo) & (idx < lo + batch_size)
            for e in np.unique(epoch[mine]).tolist():
                sel = mine & (epoch == e)
                blocks[idx[sel] - lo] = self._order(k, e)(pos[sel])
            self.epoch[k], self.position[k] = int(epoch[-1]), int(pos[-1]) + 1
            if k in self._legacy and self._legacy[k] < self.epoch[k]:
                del self._legacy[k]  # the old checkpoint's epoch is finished
        mine = doms[lo : lo + batch_size]
        tokens = np.stack(
            [self.streams[k].block(b) for k, b in zip(mine.tolist(), blocks.tolist())]
        )
        self.consumed_samples += len(doms)
        return torch.from_numpy(tokens), torch.from_numpy(mine.copy())

    def state_dict(self) -> dict:
        """JSON-serialisable; identical on every data-parallel rank."""
        return {
            "domains": list(self.domains),
            "block_size": self.block_size,
            "seed": self.seed,
            "num_blocks": [s.num_blocks for s in self.streams],
            "epoch": list(self.epoch),
            "position": list(self.position),
            "order": ORDER,
            "legacy_order_epochs": {self.domains[k]: e for k, e in self._legacy.items()},
            "consumed_samples": self.consumed_samples,
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["domains"]) != self.domains:
            raise ValueError(f"data state is for domains {sd['domains']}, not {self.domains}")
        if sd["block_size"] != self.block_size or sd["seed"] != self.seed:
            raise ValueError(
                f"data state has block_size {sd['block_size']} and seed "
                f"{sd['seed']}; this run uses {self.block_size} and {self.seed}"
            )
        now = [s.num_blocks for s in self.streams]
        if list(sd["num_blocks"]) != now:
            raise ValueError(
                f"the datasets changed since the checkpoint: blocks per domain "
                f"{dict(zip(self.domains, sd['num_blocks']))} then, "
                f"{dict(zip(self.domains, now))} now"
            )
        order = sd.get("order")
        if order not in (None, ORDER):
            raise ValueError(
                f"data state uses the block order {order!r}; this version knows "
                f"{ORDER!r} (and older states without one)"
            )
        self.epoch = [int(x) for x in sd["epoch"]]
        self.position = [int(x) for x in sd["position"]]
        self._orders.clear()
        if order is None:
            # Saved before the per-position order: finish each partly read epoch in the old
            # materialised permutation, so the resume is exact; later epochs use the new order.
            self._legacy = {k: self.epoch[k] for k, n in enumerate(now) if 0 < self.position[k] < n}
            if self._legacy:
                self.log(
                    "data: the checkpoint predates the per-position block order; "
                    + ", ".join(self.domains[k] for k in self._legacy)
                    + " finish their current epoch in the old (materialised) order"
                )
        else:
            legacy = sd.get("legacy_order_epochs") or {}
            self._legacy = {self.domains.index(d): int(e) for d, e in legacy.items()}
        self.consumed_samples = int(sd["consumed_samples"])
        self.sampler.load_state_dict(sd["sampler"])


def _legacy_permutation(n: int, seed: int, epoch: int, k: int) -> np.ndarray:
    """The order of versions before order.py (a materialised permutation, 4-8 bytes per block):
    only to finish an epoch that an old checkpoint had started."""
    rng = np.random.default_rng([seed, epoch, k])
    dtype = np.int32 if n < 2**31 else np.int64
    return rng.permutation(np.arange(n, dtype=dtype))
