"""Per-sample domain choice with static or dynamically updated weights (LLaMA-MoE / Sheared-LLaMA).

Every rank builds the same sampler with the same seed and draws the same global sequence of
domains. Each sample consumes exactly one uniform double from the generator, so the sequence does
not depend on how draws are batched, and a checkpointed generator state resumes it exactly.

Update rules, with w the current weights, l the per-domain validation losses, r the reference
losses and K domains (all in float64):
    sheared_llama        a = softmax(log w + eta * (l - r));  w' = (1 - c) * a + c / K
    sheared_llama_paper  a = w * exp(max(0, l - r));          w' = a / sum(a)
    none                 w' = w (the losses are still recorded in the history)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .domains import check_domain_names, load_prob_map, load_ref_loss

RULES = ("none", "sheared_llama", "sheared_llama_paper")


def _as_weights(weights, domains: list[str]) -> np.ndarray:
    if isinstance(weights, (str, Mapping)):
        w = load_prob_map(weights, domains)
        return np.array([w[d] for d in domains], np.float64)
    w = np.asarray(weights, np.float64)
    if w.shape != (len(domains),):
        raise ValueError(f"weights: expected {len(domains)} values for {domains}, got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0, with a positive sum: {w.tolist()}")
    return w / w.sum()


class DomainSampler:
    def __init__(
        self,
        domains: Sequence[str],
        weights,
        rule: str = "none",
        ref_loss=None,
        seed: int = 0,
        eta: float = 1.0,
        c: float = 1e-4,
    ):
        if rule not in RULES:
            raise ValueError(f"unknown dynamic data selection rule {rule!r}; choose from {RULES}")
        if len(set(domains)) != len(domains) or not domains:
            raise ValueError(f"domains must be a non-empty list of distinct names: {domains}")
        self.domains = list(domains)
        self.rule, self.eta, self.c, self.seed = rule, float(eta), float(c), int(seed)
        self._w = _as_weights(weights, self.domains)
        self.ref_loss = None
        if ref_loss is not None or rule != "none":
            r = load_ref_loss("llama2_7b" if ref_loss is None else ref_loss, self.domains)
            self.ref_loss = np.array([r[d] for d in self.domains], np.float64)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.num_samples = 0
        self.counts = np.zeros(len(self.domains), np.int64)
        self.history: list[dict] = []

    @property
    def weights(self) -> np.ndarray:
        return self._w.copy()

    def weights_dict(self) -> dict:
        return {d: float(w) for d, w in zip(self.domains, self._w)}

    def sample(self, n: int | None = None):
        """One domain index (n None) or an int64 array of n domain indices."""
        k = 1 if n is None else int(n)
        cdf = np.cumsum(self._w)
        cdf[-1] = 1.0  # guard against rounding: u < 1 always lands in a domain
        idx = np.searchsorted(cdf, self._rng.random(k), side="right")
        idx = np.minimum(idx, len(self.domains) - 1)
        self.num_samples += k
        self.counts += np.bincount(idx, minlength=len(self.domains))
        return int(idx[0]) if n is None else idx.astype(np.int64)

    def update(self, val_losses: Mapping[str, float], step: int | None = None) -> np.ndarray:
        """Apply the rule to per-domain validation losses; returns the new weights."""
        check_domain_names(val_losses, self.domains, "validation losses")
        loss = np.array([float(val_losses[d]) for d in self.domains], np.float64)
        if not np.all(np.isfinite(loss)):
            raise ValueError(f"non-finite validation loss: {dict(val_losses)}")
        w, r, K = self._w, self.ref_loss, len(self.domains)
        if self.rule == "sheared_llama":
            with np.errstate(divide="ignore"):  # log 0 = -inf: a zero weight stays at c / K
                z = np.log(w) + self.eta * (loss - r)
            a = np.exp(z - z.max())
            a /= a.sum()
            new = (1.0 - self.c) * a + self.c / K
            new /= new.sum()
        elif self.rule == "sheared_llama_paper":
            a = w * np.exp(np.maximum(0.0, loss - r))
            new = a / a.sum()
        else:
            new = w.copy()
        self._w = new
        self.history.append(
            {
                "step": step,
                "num_samples": self.num_samples,
                "losses": loss.tolist(),
                "weights": new.tolist(),
            }
        )
        return self.weights

    def state_dict(self) -> dict:
        """JSON-serialisable (lists, numbers, strings; the 128-bit RNG words as strings)."""
        st = self._rng.bit_generator.state
        rng = {
            "bit_generator": st["bit_generator"],
            "state": str(st["state"]["state"]),
            "inc": str(st["state"]["inc"]),
            "has_uint32": int(st["has_uint32"]),
            "uinteger": int(st["uinteger"]),
        }
        return {
            "domains": list(self.domains),
            "rule": self.rule,
            "seed": self.seed,
            "weights": self._w.tolist(),
            "rng": rng,
            "num_samples": int(self.num_samples),
            "counts": self.counts.tolist(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, sd: Mapping) -> None:
        if list(sd["domains"]) != self.domains:
            raise ValueError(
                f"sampler state is for domains {list(sd['domains'])}, this run uses {self.domains}"
            )
        w = np.array(sd["weights"], np.float64)
        if w.shape != self._w.shape or not math.isclose(w.sum(), 1.0, rel_tol=1e-9):
            raise ValueError(f"sampler state has invalid weights {sd['weights']}")
        r = sd["rng"]
        self._rng.bit_generator.state = {
            "bit_generator": r["bit_generator"],
            "state": {"state": int(r["state"]), "inc": int(r["inc"])},
            "has_uint32": int(r["has_uint32"]),
            "uinteger": int(r["uinteger"]),
        }
        # The checkpoint wins over the constructor for everything that shapes the sequence;
        # the rule and its constants stay as constructed (a resumed run may change them).
        self._w = w
        self.seed = int(sd["seed"])
        self.num_samples = int(sd["num_samples"])
        self.counts = np.array(sd["counts"], np.int64)
        self.history = [dict(h) for h in sd["history"]]
