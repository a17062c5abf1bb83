"""The SlimPajama domains, static domain weights (prob_map) and reference losses.

Values are those of LLaMA-MoE / Sheared-LLaMA (see the README, section Data). A user may instead pass a json
file {"<domain>": value, ...}; every loader checks that the names match the domains in use
exactly, because a silently missing domain would train on the wrong mixture.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

DOMAINS = ["en_cc", "en_c4", "github", "en_wikipedia", "en_book", "en_arxiv", "en_stack"]

PROB_MAPS = {
    "llama": dict(zip(DOMAINS, [0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02])),
    "sheared_llama": dict(zip(DOMAINS, [0.361, 0.492, 0.008, 0.031, 0.091, 0.007, 0.010])),
    "uniform": None,  # 1/K over whichever domains are in use
}

REF_LOSSES = {
    # Validation losses of LLaMA-2-7B on each domain (LLaMA-MoE's reference).
    "llama2_7b": dict(zip(DOMAINS, [1.6917, 2.0749, 0.6984, 1.5899, 1.9252, 1.2408, 1.4975])),
    # Sheared-LLaMA's scaling-law predictions for a 2.7B target.
    "sheared_llama_2.7b": dict(
        zip(DOMAINS, [1.8712, 2.0328, 0.6883, 1.6297, 2.0325, 1.3560, 1.5353])
    ),
}
DEFAULT_REF_LOSS = "llama2_7b"


def check_domain_names(names: Iterable[str], domains: Iterable[str], what: str) -> None:
    """Raise ValueError unless `names` are exactly `domains`, naming the missing and extra ones."""
    names, domains = list(names), list(domains)
    missing = [d for d in domains if d not in names]
    extra = [n for n in names if n not in domains]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"extra {extra}")
        raise ValueError(f"{what} must name exactly the domains {domains}: " + ", ".join(parts))


def _load_json_map(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid json: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise ValueError(f"{what} file {path} must hold a json object {{domain: number}}")
    return {str(k): float(v) for k, v in data.items()}


def _resolve(spec, presets: Mapping, domains, what: str) -> dict:
    if isinstance(spec, Mapping):
        values = {str(k): float(v) for k, v in spec.items()}
    elif isinstance(spec, str) and spec in presets:
        values = presets[spec]
        if values is None:  # "uniform"
            return {d: 1.0 / len(domains) for d in domains}
        values = dict(values)
    elif isinstance(spec, str) and os.path.isfile(spec):
        values = _load_json_map(spec, what)
    else:
        raise ValueError(f"{what} {spec!r} is neither a preset {sorted(presets)} nor a json file")
    check_domain_names(values, domains, f"{what} {spec if isinstance(spec, str) else ''}".strip())
    bad = [d for d, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: non-finite values for {bad}")
    return {d: values[d] for d in domains}


def load_prob_map(spec, domains: Iterable[str] = DOMAINS) -> dict:
    """prob_map preset name ("llama", "sheared_llama", "uniform"), json path or dict ->
    {domain: weight} in the order of `domains`, normalised to sum 1."""
    domains = list(domains)
    w = _resolve(spec, PROB_MAPS, domains, "prob_map")
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"prob_map weights must be >= 0 with a positive sum, got {w}")
    total = sum(w.values())
    return {d: v / total for d, v in w.items()}


def load_ref_loss(spec=DEFAULT_REF_LOSS, domains: Iterable[str] = DOMAINS) -> dict:
    """Reference-loss preset name ("llama2_7b", "sheared_llama_2.7b"), json path or dict ->
    {domain: loss} in the order of `domains`."""
    return _resolve(spec, REF_LOSSES, list(domains), "ref_loss")
