"""Statistics of a dense model's FFN hidden units on sample text, for the graph and gradient
splits. The model is megamoe's dense LLaMA (model/llama.py, world size 1); the hidden units h =
silu(gate x) * (up x) are the input of each layer's down_proj (megatron-core's linear_fc2), read
with forward pre-hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .clustering import balanced_kmeans
from .graph import CoactivationCounter


def sample_token_windows(
    prefixes: Sequence[str],
    num_samples: int,
    seq_length: int,
    seed: int,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """num_samples windows of seq_length tokens drawn (seeded) from Megatron indexed datasets
    (`prefix`.bin/.idx), spread evenly over the prefixes. Returns int64 [num_samples, seq_length]."""
    from ..data.indexed import IndexedDataset

    if not prefixes:
        raise ValueError(
            "the graph and gradient splits need sample text: give --split-data "
            "PREFIX (a Megatron indexed dataset, PREFIX.bin/.idx)"
        )
    if num_samples < 1 or seq_length < 2:
        raise ValueError(
            f"--split-samples {num_samples} and --split-seq-length {seq_length} must "
            "be at least 1 and 2"
        )
    rng = np.random.default_rng(seed)
    out = []
    per = [
        num_samples // len(prefixes) + (i < num_samples % len(prefixes))
        for i in range(len(prefixes))
    ]
    for prefix, n in zip(prefixes, per):
        ds = IndexedDataset(prefix)
        toks = ds.tokens
        if len(toks) < seq_length:
            raise ValueError(
                f"--split-data {prefix}: {len(toks)} tokens, fewer than "
                f"--split-seq-length {seq_length}"
            )
        starts = rng.integers(0, len(toks) - seq_length + 1, size=n)
        for s in starts:
            out.append(np.asarray(toks[s : s + seq_length], dtype=np.int64))
    tokens = torch.from_numpy(np.stack(out))
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"--split-data {list(prefixes)}: token id {int(tokens.max())} is outside "
            f"the model's vocabulary ({vocab_size}); was it tokenized for this model?"
        )
    return tokens


def _mlps(model) -> list:
    layers = model.decoder.layers
    for layer in layers:
        if not hasattr(layer.mlp, "linear_fc2"):
            raise ValueError("split statistics need the dense model (an MLP with linear_fc2)")
    return [layer.mlp for layer in layers]


@contextlib.contextmanager
def _capture(model, fn: Callable[[int, torch.Tensor], None]):
    """Call fn(layer, h) with each layer's FFN hidden units h [s, b, d_ff] during forward."""
    handles = []
    for i, mlp in enumerate(_mlps(model)):
        handles.append(
            mlp.linear_fc2.register_forward_pre_hook(lambda mod, args, i=i: fn(i, args[0]))
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def coactivation_counters(
    model, tokens: torch.Tensor, batch_size: int = 8, active_fraction: float = 0.1
) -> list[CoactivationCounter]:
    """One CoactivationCounter per layer, filled by forward passes over `tokens` [N, L]."""
    d_ff = model.megamoe_model_config.intermediate_size
    counters = [CoactivationCounter(d_ff, active_fraction) for _ in _mlps(model)]
    model.eval()
    dev = _device(model)
    with torch.no_grad(), _capture(model, lambda i, h: counters[i].add(h)):
        for s in range(0, len(tokens), batch_size):
            t = tokens[s : s + batch_size].to(dev)
            model(t, _positions(t), None)
    return counters


def cluster_sequences(model, tokens: torch.Tensor, num_clusters: int, seed: int = 0) -> np.ndarray:
    """Balanced k-means (cosine) of the sample sequences' mean input embeddings into
    num_clusters groups (the 'clusters of text' of the gradient split). Labels [N]."""
    n = len(tokens)
    if n < num_clusters:
        raise ValueError(
            f"the gradient split needs at least --num-experts {num_clusters} sample "
            f"sequences (--split-samples), got {n}"
        )
    emb = model.embedding.word_embeddings.weight.detach()
    x = emb[tokens.to(emb.device)].float().mean(1).cpu().numpy()
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sizes = [n // num_clusters + (j < n % num_clusters) for j in range(num_clusters)]
    return balanced_kmeans(x, sizes, "cosine", seed)


def gradient_importance(
    model, tokens: torch.Tensor, clusters: np.ndarray, num_clusters: int, batch_size: int = 8
) -> np.ndarray:
    """scores [layers, clusters, d_ff]: sum over the tokens of each cluster's sequences of
    |h * dL/dh|, L the summed next-token loss (each sequence's loss depends on its own h only,
    so per-sequence sums are exact attributions)."""
    from ..model.llama import lm_inputs

    mlps = _mlps(model)
    d_ff = model.megamoe_model_config.intermediate_size
    scores = torch.zeros(len(mlps), num_clusters, d_ff, dtype=torch.float64)
    model.eval()  # no dropout; gradients still flow
    dev = _device(model)
    for p in model.parameters():
        p.requires_grad_(False)
    clusters_t = torch.as_tensor(clusters, dtype=torch.long)
    for s in range(0, len(tokens), batch_size):
        t = tokens[s : s + batch_size].to(dev)
        groups = clusters_t[s : s + batch_size]
        acts: dict[int, torch.Tensor] = {}

        def keep(i, h):
            h.retain_grad()
            acts[i] = h

        with _capture(model, keep), torch.enable_grad():
            # embeddings do not need grad: make the hidden units part of the graph instead
            pos, labels, mask = lm_inputs(t)
            emb_out = model.embedding(input_ids=t, position_ids=pos)
            emb_out.requires_grad_(True)
            loss = model(t, pos, None, decoder_input=emb_out, labels=labels)
            (loss.float() * mask.to(loss.device)).sum().backward()
        for i, h in acts.items():
            imp = (h.detach() * h.grad).abs().double().sum(0).cpu()  # [b, d_ff] per sequence
            scores[i].index_add_(0, groups, imp)
    for p in model.parameters():
        p.requires_grad_(True)
    return scores.numpy()
