"""What a user sees: console lines, <output_dir>/train.log, <output_dir>/train_log.jsonl and
tensorboard under <output_dir>/runs/<logging-dir>/ (rank 0 writes; other ranks stay quiet).

Tensorboard tags
    train/loss, train/lm_loss, train/balance_loss, train/lr, train/grad_norm,
    train/tokens_per_sec_per_gpu, train/mfu, train/time_per_step, train/consumed_tokens,
    train/gpu_memory_gb (CUDA), train/loss_on_tokens (x axis: consumed tokens)
    eval/<domain>_loss, eval/loss (mean over domains), prob_map/<domain> (domain weights)
    moe/expert_load/layer_<i>      histogram over expert index of the tokens routed there
                                   (the last logged step's micro-batches, this run's ranks summed)
    moe/expert_load_heatmap        image, layer x expert, at each evaluation (all domains)
    routing/<domain>               image, layer x expert, which experts the domain's tokens chose
    routing/specialisation/layer_<i>   how domain-specific the routing of layer i is (see
                                   `specialisation`), and routing/specialisation/mean

Heatmaps are written with numpy (no matplotlib): one cell per (layer, expert), colour = the
expert's share of the layer's selections x E (1.0 = perfectly balanced) on a viridis-like scale
from 0 to 2 (clipped), so images are comparable across steps and domains.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from datetime import datetime

import numpy as np

# viridis anchors (0, .25, .5, .75, 1)
_CMAP = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def default_logging_dir(output_dir: str, now: float | None = None) -> str:
    """HF's layout: <output_dir>/runs/<Mon>DD_HH-MM-SS_<hostname>."""
    stamp = datetime.fromtimestamp(now or time.time()).strftime("%b%d_%H-%M-%S")
    return os.path.join(output_dir, "runs", f"{stamp}_{socket.gethostname()}")


def heatmap_image(rel: np.ndarray, vmax: float = 2.0) -> np.ndarray:
    """[L, E] values -> uint8 image [3, H, W] (CHW), cells of equal size."""
    rel = np.nan_to_num(np.asarray(rel, np.float64))
    L, E = rel.shape
    cell_w = max(4, min(32, 512 // max(E, 1)))
    cell_h = max(4, min(32, 384 // max(L, 1)))
    x = np.clip(rel / vmax, 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_CMAP) - 2)
    frac = (x - lo)[..., None]
    rgb = _CMAP[lo] * (1 - frac) + _CMAP[lo + 1] * frac  # [L, E, 3]
    img = np.repeat(np.repeat(rgb, cell_h, axis=0), cell_w, axis=1)
    # thin dark separators between layers, so rows are countable
    img[cell_h - 1 :: cell_h, :, :] *= 0.6
    return img.round().astype(np.uint8).transpose(2, 0, 1)


def relative_load(counts: np.ndarray) -> np.ndarray:
    """[L, E] selection counts -> share of each layer's selections x E (1 = balanced)."""
    counts = np.asarray(counts, np.float64)
    tot = counts.sum(1, keepdims=True)
    return np.where(tot > 0, counts / np.maximum(tot, 1) * counts.shape[1], 0.0)


def specialisation(per_domain: dict) -> np.ndarray:
    """Per layer, how much the expert choice depends on the domain, in [0, 1].

    With p_d the distribution of domain d's expert selections in a layer (domains weighted
    equally) and p their mean: JS = H(p) - mean_d H(p_d), the mutual information between the
    domain and the chosen expert (generalised Jensen-Shannon divergence), divided by its maximum
    log(min(#domains, E)). 0: every domain uses the experts in the same proportions; 1: the
    domains use disjoint sets of experts."""
    mats = [np.asarray(c, np.float64) for c in per_domain.values()]
    if len(mats) < 2:
        return np.zeros(mats[0].shape[0] if mats else 0)
    P = np.stack([m / np.maximum(m.sum(1, keepdims=True), 1e-30) for m in mats])  # [D, L, E]

    def H(p):
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)

    js = H(P.mean(0)) - H(P).mean(0)
    return np.clip(js / math.log(min(len(mats), P.shape[-1])), 0.0, 1.0)


class RunLogger:
    """Rank 0 logs; on other ranks every method is a no-op (console errors go to stderr)."""

    def __init__(self, output_dir: str, logging_dir: str | None, enabled: bool):
        self.enabled = enabled
        self.output_dir = output_dir
        self.logging_dir = logging_dir
        self.tb = None
        self._log_file = self._jsonl = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self._log_file = open(os.path.join(output_dir, "train.log"), "a", buffering=1)
            self._jsonl = open(os.path.join(output_dir, "train_log.jsonl"), "a", buffering=1)

    def open_tensorboard(self) -> None:
        if self.enabled and self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.logging_dir, exist_ok=True)
            self.tb = SummaryWriter(log_dir=self.logging_dir)

    def info(self, msg: str = "") -> None:
        if not self.enabled:
            return
        print(msg, flush=True)
        self._log_file.write(msg + "\n")

    def file_only(self, msg: str) -> None:
        if self.enabled:
            self._log_file.write(msg + "\n")

    def warning(self, msg: str) -> None:
        if self.enabled:
            print(f"warning: {msg}", file=sys.stderr, flush=True)
            self._log_file.write(f"warning: {msg}\n")

    def error(self, msg: str) -> None:
        """Errors print on every rank that has them (and go to the log files on rank 0)."""
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if self.enabled:
            self._log_file.write(f"error: {msg}\n")

    def record(self, kind: str, step: int, values: dict) -> None:
        if self.enabled:
            self._jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")

    def scalars(self, step: int, values: dict) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(float(v)):
                    self.tb.add_scalar(k, float(v), step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None and value is not None and math.isfinite(float(value)):
            self.tb.add_scalar(tag, float(value), step)

    def expert_histograms(
        self, step: int, counts: np.ndarray, tag: str = "moe/expert_load"
    ) -> None:
        """counts [L, E]: one histogram per layer over expert index."""
        if self.tb is None:
            return
        counts = np.asarray(counts, np.float64)
        E = counts.shape[1]
        idx = np.arange(E, dtype=np.float64)
        for i, c in enumerate(counts):
            n = c.sum()
            if n <= 0:
                continue
            self.tb.add_histogram_raw(
                f"{tag}/layer_{i}",
                min=0.0,
                max=float(E - 1),
                num=float(n),
                sum=float((c * idx).sum()),
                sum_squares=float((c * idx * idx).sum()),
                bucket_limits=(idx + 0.5).tolist(),
                bucket_counts=c.tolist(),
                global_step=step,
            )

    def heatmap(self, tag: str, counts: np.ndarray, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, heatmap_image(relative_load(counts)), step, dataformats="CHW")

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        for f in (self._log_file, self._jsonl):
            if f is not None:
                f.close()
        self._log_file = self._jsonl = None
        self.enabled = False  # what comes after (an error at export) reopens the files


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
