"""Run configuration: one dataclass per concern; the command-line flags are generated from them.

Flag names are the LLaMA-MoE training guide's (``--num_selects``, ``--gate_balance_loss_weight``,
``--moe_calculator_score_scale_factor``, ``--dynamic_data_selection`` ...), so scripts written for
the published trainer read the same. A YAML/JSON file may give the same keys; flags override it.

Each knob has one internal name (a field name: ``score_scale_factor``, ``gate_network``); where
the guide spells its flag otherwise, the field's metadata says so (``flag=...``). Each section
checks itself (``check()`` returns findings, megamoe/findings.py); the trainer's plan, `megamoe
check` and the converter call the same checks. This module imports neither torch nor
megatron-core, so the cheap tools stay cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .command import FlagParser
from .findings import FLAG_NAMES, ConfigError, Finding, at_least, error, underscore_flag, warning

GATE_TYPES = ("TopKBalancedNoisyGate", "SwitchBalancedGate")
GATE_NETWORKS = ("mlp", "linear")
GATE_LOAD_RULES = ("shazeer", "published")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_NUM_EXPERTS = 16  # a LLaMA-MoE cut from a dense model on the fly (LLaMA-MoE-3.5B's)
DEFAULT_NUM_SELECTS = 4


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class ModelConfig:
    """LLaMA shapes (HF LlamaConfig names)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self) -> list[Finding]:
        out: list[Finding] = []
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                out.append(error(name, f"{name} {v!r} must be a positive integer"))
        if out:
            return out
        if self.hidden_size % self.num_attention_heads:
            out.append(
                error(
                    "hidden_size",
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}",
                )
            )
        if self.kv_heads < 1 or self.num_attention_heads % self.kv_heads:
            out.append(
                error(
                    "num_key_value_heads",
                    f"num_attention_heads "
                    f"{self.num_attention_heads} is not divisible by "
                    f"num_key_value_heads {self.kv_heads}",
                )
            )
        return out


@dataclass
class MoEConfig:
    """LLaMA-MoE's MoE fields (HF LLaMA-MoE config names; flags in parentheses)."""

    num_experts: int = DEFAULT_NUM_EXPERTS
    num_selects: int = DEFAULT_NUM_SELECTS  # top-k (--num_selects)
    # None: equal sizes intermediate_size / num_experts; else one list of sizes per layer.
    size_experts: list | None = None
    gate_type: str = "TopKBalancedNoisyGate"  # or "SwitchBalancedGate" (--gate_type)
    gate_network: str = "mlp"  # "mlp" | "linear" (--gate_network_type)
    gate_use_softmax: bool = True
    gate_use_balance: bool = True
    gate_balance_loss_weight: float = 1e-2
    gate_add_noise: bool = True
    gate_noise_epsilon: float = 1e-2
    # How TopKBalancedNoisyGate decides that an expert is "in" the top-k when computing the
    # smooth load: "shazeer" compares the full noisy logit (Shazeer et al. 2017, our default);
    # "published" compares only the noise term, as the released LLaMA-MoE code does.
    gate_load_rule: str = "shazeer"
    # One float, or one per layer. None: num_experts / num_selects (--moe_calculator_score_scale_factor)
    score_scale_factor: float | list | None = None
    multiply_gate_scores: bool = True
    capacity_factor: float = 1.25  # SwitchBalancedGate with drop_tokens
    drop_tokens: bool = False

    # Knobs fixed by the weights of a LLaMA-MoE model: a run or conversion cannot change them.
    FIXED = ("num_experts", "gate_network", "gate_type")

    def scale_factor(self, layer: int) -> float:
        sf = self.score_scale_factor
        if sf is None:
            return self.num_experts / self.num_selects
        if isinstance(sf, (list, tuple)):
            return float(sf[layer])
        return float(sf)

    def expert_sizes(self, layer: int, intermediate_size: int) -> list[int]:
        if self.size_experts is None:
            return [intermediate_size // self.num_experts] * self.num_experts
        return [int(s) for s in self.size_experts[layer]]

    def with_overrides(self, **given) -> tuple[MoEConfig, list[Finding]]:
        """This config with the knobs a user gave (None: not given) replacing its values. The
        knobs in FIXED shape the weights: a different value is an error, not an override."""
        out = dataclasses.replace(self)
        findings = []
        for knob, value in given.items():
            if value is None:
                continue
            mine = getattr(self, knob)
            if knob in self.FIXED and value != mine:
                findings.append(
                    error(
                        knob,
                        f"{{flag}} {value}: the pretrained model has {knob} {mine!r}",
                        "it is fixed by the model's weights; leave the flag out",
                    )
                )
            else:
                setattr(out, knob, value)
        return out, findings

    def check(self, model: ModelConfig | None = None) -> list[Finding]:
        e, k = self.num_experts, self.num_selects
        out: list[Finding] = []
        if not isinstance(e, int) or e < 1:
            return [error("num_experts", f"{{flag}} {e!r} must be at least 1")]
        if not isinstance(k, int) or k < 1 or k > e:
            out.append(
                error(
                    "num_selects", f"{{flag}} {k} must be between 1 and the number of experts {e}"
                )
            )
        if self.gate_type not in GATE_TYPES:
            out.append(
                error("gate_type", f"{{flag}} {self.gate_type!r}: choose {' or '.join(GATE_TYPES)}")
            )
        elif self.gate_type == "SwitchBalancedGate" and k != 1:
            out.append(
                error(
                    "num_selects",
                    "SwitchBalancedGate routes each token to one expert",
                    "set {flag} 1",
                )
            )
        if self.gate_network not in GATE_NETWORKS:
            out.append(
                error("gate_network", f"{{flag}} {self.gate_network!r}: choose mlp or linear")
            )
        if self.gate_load_rule not in GATE_LOAD_RULES:
            out.append(
                error(
                    "gate_load_rule",
                    f"{{flag}} {self.gate_load_rule!r}: choose shazeer or published",
                )
            )
        w = self.gate_balance_loss_weight
        if not _finite(w) or w < 0:
            out.append(error("gate_balance_loss_weight", f"{{flag}} {w} must be >= 0"))
        if not _finite(self.capacity_factor) or self.capacity_factor <= 0:
            out.append(
                error("capacity_factor", f"capacity_factor {self.capacity_factor} must be positive")
            )
        sf = self.score_scale_factor
        sfs = sf if isinstance(sf, (list, tuple)) else ([] if sf is None else [sf])
        if any(not _finite(v) or v <= 0 for v in sfs):
            out.append(error("score_scale_factor", f"{{flag}} {fmt_value(sf)} must be positive"))
        if out:
            return out
        if model is not None:
            layers = model.num_hidden_layers
            if self.size_experts is None:
                if model.intermediate_size % e:
                    out.append(
                        error(
                            "num_experts",
                            f"intermediate_size {model.intermediate_size} "
                            f"is not divisible by {{flag}} {e}",
                            "choose a number of experts that divides it",
                        )
                    )
            elif len(self.size_experts) != layers or any(len(s) != e for s in self.size_experts):
                out.append(
                    error("num_experts", f"size_experts must hold {layers} lists of {e} sizes")
                )
            if isinstance(sf, (list, tuple)) and len(sf) != layers:
                out.append(
                    error(
                        "score_scale_factor", f"{{flag}} has {len(sf)} values for {layers} layers"
                    )
                )
                return out
            sfs = [self.scale_factor(i) for i in range(layers)]
        want = e / k
        off = sorted({v for v in sfs if not math.isclose(v, want, rel_tol=1e-6)})
        if off:
            out.append(
                warning(
                    "score_scale_factor",
                    f"{{flag}} {off[0] if len(off) == 1 else off} "
                    f"is not #experts / #selected = {e}/{k} = {want:g}",
                    "the experts' output is scaled differently from the dense FFN the "
                    "model was cut from",
                )
            )
        return out


def fmt_value(x: Any) -> str:
    """A flag's value as a user writes it: 8.0 -> 8, lists comma-separated."""
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, (list, tuple)):
        return ",".join(fmt_value(v) for v in x)
    return str(x)


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return obj


def to_dict(cfg: Any) -> dict:
    return _to_jsonable(cfg)


def from_dict(cls, data: dict):
    """Build dataclass `cls` from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)


# ---------------------------------------------------------------------------------------------
# core attention's kernels (torch.nn.attention.SDPBackend), "auto" leaving the choice to torch
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")

# The training run: one dataclass per concern; `build_parser` turns their fields into flags.
#
# Every field becomes `--<flag>`, the field's name unless metadata["flag"] gives the guide's
# spelling; `metadata["help"]` is its help text, `metadata["choices"]` its allowed values,
# `metadata["parse"]` a parser for values that are not plain int/float/str/bool. A boolean flag
# given bare (`--bf16`) means true; `--bf16 false` also works. Fields whose default is None are
# "not given" (inferred, or taken from the pretrained checkpoint).


def _h(help: str, **extra) -> dict:
    return {"help": help, **extra}


def parse_float_or_list(text) -> float | list:
    """'4' -> 4.0; '4,4,8' -> [4.0, 4.0, 8.0] (one value per layer); a list passes through."""
    if isinstance(text, (int, float)):
        return float(text)
    if isinstance(text, (list, tuple)):
        return [float(x) for x in text]
    parts = [p for p in str(text).replace("[", "").replace("]", "").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r}: expected a number or numbers separated by commas") from None
    if not vals:
        raise ValueError(f"{text!r}: expected a number")
    return vals[0] if len(vals) == 1 else vals


def parse_str_list(text) -> list:
    """'q,k,v' -> ['q', 'k', 'v']; a list passes through."""
    if isinstance(text, (list, tuple)):
        return [str(x).strip() for x in text]
    return [p.strip() for p in str(text).split(",") if p.strip()]


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text) -> int:
    """Token counts: '100000', '1e11', '100B', '200b', '1.5T' -> int."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = 1.0
    if s and s[-1] in _SUFFIX:
        mult, s = _SUFFIX[s[-1]], s[:-1]
    try:
        return int(round(float(s) * mult))
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r}: expected a count such as 100000, 1e11 or 100B") from None


def parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"{text!r}: expected true or false")


def lora_findings(rank: int, dropout: float, targets) -> list[Finding]:
    """The LoRA hyper-parameters' rules (the trainer's flags and model/lora.py's LoRASpec)."""
    out = at_least("lora_rank", rank, 1)
    if not 0.0 <= dropout < 1.0:
        out.append(error("lora_dropout", f"{{flag}} {dropout} must be in [0, 1)"))
    bad = [x for x in targets if x not in LORA_TARGETS]
    if bad or not targets:
        out.append(
            error(
                "lora_targets",
                f"{{flag}} {','.join(targets)}: choose from {','.join(LORA_TARGETS)}",
            )
        )
    return out


@dataclass
class TrainConfig:
    """What to train, where outputs go, how long, and what is logged and saved."""

    model_type: str = field(
        default="llama_moe",
        metadata=_h("llama (dense) or llama_moe", choices=("llama", "llama_moe")),
    )
    pretrained_model: str | None = field(
        default=None,
        metadata=_h(
            "a megamoe checkpoint directory, or a Hugging Face LLaMA / LLaMA-MoE directory "
            "(converted on the fly into <output_dir>/pretrained-*)"
        ),
    )
    tokenizer_model: str | None = field(
        default=None,
        metadata=_h(
            "sentencepiece tokenizer.model (checked against the vocabulary; copied into HF exports)"
        ),
    )
    output_dir: str | None = field(
        default=None,
        metadata=_h("checkpoints (checkpoint-<step>/), tensorboard (runs/<logging-dir>/) and logs"),
    )
    logging_dir: str | None = field(
        default=None,
        metadata=_h(
            "tensorboard directory (default <output_dir>/runs/<Mon>DD_HH-MM-SS_<hostname>)"
        ),
    )
    training_mode: str = field(
        default="fpt",
        metadata=_h(
            "fpt (full-parameter training) or lora (adapters only)", choices=("fpt", "lora")
        ),
    )
    lora_rank: int = field(default=8, metadata=_h("LoRA rank r"))
    lora_alpha: float = field(
        default=32.0, metadata=_h("LoRA alpha (the update is scaled by alpha / r)")
    )
    lora_dropout: float = field(default=0.05, metadata=_h("dropout on the LoRA branch's input"))
    lora_targets: list = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata=_h(
            "comma-separated modules that get adapters: q,k,v,o (attention) and gate,up,down (the "
            "dense MLP or every expert)",
            parse=parse_str_list,
        ),
    )
    lora_train_gates: bool = field(
        default=True,
        metadata=_h("LoRA mode, llama_moe: also train the MoE gates (the rest stays frozen)"),
    )
    max_steps: int | None = field(
        default=None, metadata=_h("optimizer steps to train (give this or --max_tokens)")
    )
    max_tokens: int | None = field(
        default=None,
        metadata=_h(
            "tokens to train on, e.g. 100B; max_steps = max_tokens / #tokens per batch",
            parse=parse_count,
        ),
    )
    eval_steps: int = field(
        default=0,
        metadata=_h(
            "evaluate on every domain's validation set every N steps (0: only at the end); "
            "dynamic data selection updates the domain weights at each evaluation"
        ),
    )
    eval_at_start: bool = field(default=False, metadata=_h("also evaluate before the first step"))
    logging_steps: int = field(default=5, metadata=_h("console line and tensorboard every N steps"))
    save_steps: int = field(
        default=1000,
        metadata=_h("checkpoint every N steps (0: only at the end); always one at the end"),
    )
    exit_interval: int | None = field(
        default=None,
        metadata=_h(
            "save and exit (code 0) after a step that is a multiple of this, keeping the schedule of "
            "--max_steps: run the same command to go on (Megatron's --exit-interval; fixed-length "
            "allocations)"
        ),
    )
    save_total_limit: int | None = field(
        default=None, metadata=_h("keep only the newest N checkpoints (default: keep all)")
    )
    seed: int = field(
        default=1227, metadata=_h("seed of the model-side RNG and the data order (0 .. 2^32 - 1)")
    )
    bf16: bool = field(
        default=False,
        metadata=_h(
            "bf16 parameters with fp32 main parameters in the optimizer (GPUs); on CPU, fp32 "
            "parameters with bf16 autocast"
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_h("activation recomputation (full, every layer)")
    )
    attention_backend: str = field(
        default="auto",
        metadata=_h(
            "torch SDPA kernel for core attention: auto (the fastest for the GPU: cuDNN's first "
            "on Hopper, else torch's order), cudnn, flash, efficient (GPUs) or math (the plain "
            "reference); all exact up to rounding",
            choices=ATTENTION_BACKENDS,
        ),
    )
    peak_tflops: float | None = field(
        default=None,
        metadata=_h(
            "peak TFLOP/s of one device for MFU (default: 989 on H100/H200 in bf16, the device's "
            "spec where known, a nominal 1 on CPU)"
        ),
    )
    resume: bool = field(
        default=True,
        metadata=_h(
            "resume from the newest complete checkpoint in --output_dir (false: refuse to start "
            "when one exists)"
        ),
    )
    load_optimizer: bool = field(
        default=True,
        metadata=_h(
            "on resume, load the optimizer state; false: the weights, data position, schedule and "
            "counters only, with fresh Adam moments (Megatron's --no-load-optim; a way on when the "
            "saved optimizer state cannot be read)"
        ),
    )
    export_hf: bool = field(
        default=False,
        metadata=_h(
            "at the end, export the final model (LoRA merged) to <output_dir>/hf in Hugging Face "
            "format"
        ),
    )
    comment: str = field(default="", metadata=_h("free text recorded in the logs and checkpoints"))

    def check(self) -> list[Finding]:
        out = [
            error(k, "{flag} is required")
            for k in ("pretrained_model", "output_dir")
            if not getattr(self, k)
        ]
        out += at_least("logging_steps", self.logging_steps, 1)
        out += at_least("eval_steps", self.eval_steps, 0)
        out += at_least("save_steps", self.save_steps, 0)
        out += at_least("exit_interval", self.exit_interval, 1, " (or leave it out)")
        out += at_least("save_total_limit", self.save_total_limit, 1, " (or leave it out)")
        if not 0 <= self.seed < 2**32:
            out.append(error("seed", f"{{flag}} {self.seed} must be between 0 and 2^32 - 1"))
        if (self.max_steps is None) == (self.max_tokens is None):
            out.append(error("max_steps", "give exactly one of --max_steps and --max_tokens"))
        else:
            out += at_least("max_steps", self.max_steps, 1)
            out += at_least("max_tokens", self.max_tokens, 1)
        if self.peak_tflops is not None and not (
            _finite(self.peak_tflops) and self.peak_tflops > 0
        ):
            out.append(error("peak_tflops", f"{{flag}} {self.peak_tflops} must be positive"))
        if self.training_mode == "lora":
            out += lora_findings(self.lora_rank, self.lora_dropout, self.lora_targets)
        return out


@dataclass
class MoETrainConfig:
    """LLaMA-MoE flags of the guide. None: keep the pretrained checkpoint's value."""

    num_experts: int | None = field(
        default=None,
        metadata=_h(
            "experts per layer when --pretrained_model is a dense HF LLaMA converted on the fly "
            "(default 16); must match a LLaMA-MoE checkpoint"
        ),
    )
    num_selects: int | None = field(
        default=None,
        metadata=_h(
            "top-k: experts each token is routed to (default: the checkpoint's, 4 for a conversion)"
        ),
    )
    score_scale_factor: float | list | None = field(
        default=None,
        metadata=_h(
            "scale factor SF on the experts' output, normally #experts / #selected; one number or "
            "one per layer (comma separated)",
            parse=parse_float_or_list,
            flag="moe_calculator_score_scale_factor",
        ),
    )
    gate_balance_loss_weight: float | None = field(
        default=None, metadata=_h("weight of the balance loss (default: the checkpoint's, 1e-2)")
    )
    gate_type: str | None = field(
        default=None, metadata=_h("TopKBalancedNoisyGate or SwitchBalancedGate", choices=GATE_TYPES)
    )
    gate_network: str | None = field(
        default=None,
        metadata=_h(
            "mlp or linear (for a conversion; a checkpoint keeps its own)",
            choices=GATE_NETWORKS,
            flag="gate_network_type",
        ),
    )
    gate_add_noise: bool | None = field(default=None, metadata=_h("noisy top-k in training"))
    gate_load_rule: str | None = field(
        default=None, metadata=_h("shazeer or published", choices=GATE_LOAD_RULES)
    )
    multiply_gate_scores: bool | None = field(
        default=None, metadata=_h("weight the experts' outputs by the gate scores (and SF)")
    )
    split_seed: int = field(
        default=0,
        metadata=_h(
            "conversion on the fly: seed of the random expert split and gate initialisation"
        ),
    )

    def overrides(self) -> dict:
        """The MoEConfig knobs given as flags (None: keep the model's)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(MoEConfig)
            if hasattr(self, f.name)
        }

    def check(self) -> list[Finding]:
        # the MoE knobs are checked on the resolved MoEConfig (MoEConfig.check), where the
        # checkpoint's values are known; here only what exists before that
        return at_least("num_experts", self.num_experts, 1)


@dataclass
class DataConfig:
    """Multi-domain training data, validation sets and the domain weights."""

    dataset_dir: str | None = field(
        default=None,
        metadata=_h(
            "one folder per domain of *_document.bin/.idx (tools/preprocess_data.py output)"
        ),
    )
    validation_dir: str | None = field(
        default=None,
        metadata=_h(
            "per-domain validation sets (<domain>/*_document.idx or <domain>_<key>_document.idx)"
        ),
    )
    block_size: int = field(default=2048, metadata=_h("tokens per training sample"))
    per_device_train_batch_size: int = field(
        default=8, metadata=_h("micro-batch size per data-parallel rank")
    )
    per_device_eval_batch_size: int | None = field(
        default=None, metadata=_h("evaluation micro-batch (default: the training one)")
    )
    gradient_accumulation_steps: int = field(default=1, metadata=_h("micro-batches per step"))
    dynamic_data_selection: str = field(
        default="none",
        metadata=_h(
            "none (static weights), sheared_llama or sheared_llama_paper",
            choices=("none", "sheared_llama", "sheared_llama_paper"),
        ),
    )
    prob_map: str | None = field(
        default=None,
        metadata=_h(
            "initial domain weights: llama, sheared_llama, uniform or a json file {domain: weight} "
            "(default sheared_llama for the SlimPajama domains, else uniform)"
        ),
    )
    ref_loss: str = field(
        default="llama2_7b",
        metadata=_h(
            "dynamic selection's reference losses: llama2_7b, sheared_llama_2.7b or a json file"
        ),
    )
    dds_eta: float = field(default=1.0, metadata=_h("sheared_llama update step size"))
    dds_c: float = field(default=1e-4, metadata=_h("sheared_llama smoothing towards uniform"))
    max_eval_blocks: int | None = field(
        default=None, metadata=_h("evaluate on at most N blocks per domain (default all)")
    )

    def check(self) -> list[Finding]:
        out = [] if self.dataset_dir else [error("dataset_dir", "{flag} is required")]
        out += at_least("block_size", self.block_size, 2)
        out += at_least("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        out += at_least("per_device_eval_batch_size", self.per_device_eval_batch_size, 1)
        out += at_least("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        out += at_least("max_eval_blocks", self.max_eval_blocks, 1)
        if self.dynamic_data_selection != "none":
            if not self.validation_dir:
                out.append(
                    error(
                        "validation_dir",
                        f"--dynamic_data_selection {self.dynamic_data_selection} needs {{flag}}",
                        "the weights follow the validation losses",
                    )
                )
            if not (_finite(self.dds_eta) and self.dds_eta > 0):
                out.append(error("dds_eta", f"{{flag}} {self.dds_eta} must be positive"))
            if not (_finite(self.dds_c) and 0 <= self.dds_c <= 1):
                out.append(error("dds_c", f"{{flag}} {self.dds_c} must be between 0 and 1"))
        return out


@dataclass
class OptimConfig:
    """AdamW, gradient clipping and the learning-rate schedule."""

    learning_rate: float = field(default=2e-4, metadata=_h("peak learning rate"))
    final_lr_portion: float = field(
        default=0.0, metadata=_h("floor of the cosine decay, as a fraction of the peak")
    )
    warmup_steps: int = field(default=0, metadata=_h("linear warmup steps"))
    weight_decay: float = field(
        default=0.1, metadata=_h("AdamW weight decay (not on norms and biases)")
    )
    adam_beta1: float = field(default=0.9, metadata=_h("AdamW beta1"))
    adam_beta2: float = field(default=0.95, metadata=_h("AdamW beta2"))
    adam_epsilon: float = field(default=1e-8, metadata=_h("AdamW epsilon"))
    max_grad_norm: float = field(
        default=1.0, metadata=_h("clip the global gradient norm to this (0: no clipping)")
    )
    use_distributed_optimizer: bool | None = field(
        default=None,
        metadata=_h(
            "shard the optimizer state over data-parallel ranks (ZeRO-1; default: on with CUDA)"
        ),
    )
    optimizer_checkpoint_format: str = field(
        default="fully_reshardable",
        metadata=_h(
            "how the distributed optimizer's state is saved: fully_reshardable (resumes at any "
            "TP/PP/EP/DP layout; gathers each model-parallel shard's state over DP while saving) "
            "or dp_reshardable (faster saves, no gathering; resumes at the same TP/PP/EP layout, "
            "any DP size)",
            choices=("fully_reshardable", "dp_reshardable"),
        ),
    )

    def check(self) -> list[Finding]:
        out = []
        if not (_finite(self.learning_rate) and self.learning_rate > 0):
            out.append(
                error("learning_rate", f"{{flag}} {self.learning_rate} must be a positive number")
            )
        if not (_finite(self.final_lr_portion) and 0.0 <= self.final_lr_portion <= 1.0):
            out.append(
                error(
                    "final_lr_portion", f"{{flag}} {self.final_lr_portion} must be between 0 and 1"
                )
            )
        out += at_least("warmup_steps", self.warmup_steps, 0)
        if not (_finite(self.weight_decay) and self.weight_decay >= 0):
            out.append(
                error(
                    "weight_decay",
                    f"{{flag}} {self.weight_decay} must be >= 0",
                    "0 turns weight decay off",
                )
            )
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not (_finite(v) and 0.0 <= v < 1.0):
                out.append(error(name, f"{{flag}} {v} must be in [0, 1)"))
        if not (_finite(self.adam_epsilon) and self.adam_epsilon > 0):
            out.append(error("adam_epsilon", f"{{flag}} {self.adam_epsilon} must be positive"))
        if not (_finite(self.max_grad_norm) and self.max_grad_norm >= 0):
            out.append(
                error(
                    "max_grad_norm",
                    f"{{flag}} {self.max_grad_norm} must be >= 0",
                    "0 turns clipping off",
                )
            )
        return out


@dataclass
class ParallelConfig:
    """Processes and how the model is split over them."""

    num_nodes: int | None = field(
        default=None,
        metadata=_h("nodes (checked against the world size; default: inferred from torchrun)"),
    )
    num_gpu_per_node: int | None = field(
        default=None,
        metadata=_h("processes (GPUs) per node (checked; default: torchrun's LOCAL_WORLD_SIZE)"),
    )
    tensor_model_parallel_size: int = field(default=1, metadata=_h("TP"))
    pipeline_model_parallel_size: int = field(default=1, metadata=_h("PP"))
    expert_model_parallel_size: int = field(default=1, metadata=_h("EP"))
    sequence_parallel: bool | None = field(
        default=None,
        metadata=_h("sequence parallelism (default: on when TP > 1, which LLaMA-MoE requires)"),
    )
    overlap_grad_reduce: bool = field(
        default=False,
        metadata=_h(
            "reduce gradients over data-parallel ranks in buckets while the last micro-batch's backward "
            "still runs (Megatron's --overlap-grad-reduce; megatron-core's DDP)"
        ),
    )
    ddp_bucket_size: int | None = field(
        default=None,
        metadata=_h(
            "parameters per gradient bucket with --overlap_grad_reduce (default: megatron-core's, "
            "max(40M, 1M x DP))"
        ),
    )
    overlap_param_gather: bool = field(
        default=False,
        metadata=_h(
            "with the distributed optimizer, all-gather the updated parameters during the next forward "
            "pass instead of at the end of the step (Megatron's --overlap-param-gather; measured at DP=2 "
            "on NVLink: within noise, benchmarks/RESULTS.md)"
        ),
    )
    ep_overlap_chunks: int = field(
        default=1,
        metadata=_h(
            "EP > 1: split each MoE layer's tokens into this many chunks whose all-to-alls overlap the "
            "other chunks' expert GEMMs (1: off; measured at EP=2: slower, its extra local work costs "
            "more than it hides, benchmarks/RESULTS.md)"
        ),
    )
    tp_comm_overlap: bool = field(
        default=False,
        metadata=_h(
            "TP > 1 with sequence parallelism: overlap the attention's sequence-parallel all-gather / "
            "reduce-scatter with its GEMMs (measured at TP=2: within noise, benchmarks/RESULTS.md)"
        ),
    )

    def check(self) -> list[Finding]:
        out = []
        # (TP/PP/EP sizes: ParallelLayout.check_world, with the world they must divide)
        for name in ("num_nodes", "num_gpu_per_node", "ddp_bucket_size", "ep_overlap_chunks"):
            out += at_least(name, getattr(self, name), 1)
        if self.ddp_bucket_size is not None and not self.overlap_grad_reduce:
            out.append(
                warning(
                    "ddp_bucket_size",
                    f"{{flag}} {self.ddp_bucket_size} applies with "
                    "--overlap_grad_reduce only: ignored",
                )
            )
        return out


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def flat(self) -> dict:
        """{knob: value} over all sections."""
        return {k: v for sec in SECTIONS for k, v in to_dict(getattr(self, sec)).items()}

    def check(self) -> list[Finding]:
        """Every section's own rules, and the rules that span sections."""
        out = [f for sec in SECTIONS for f in getattr(self, sec).check()]
        d = self.data.dynamic_data_selection
        if d != "none" and self.train.eval_steps <= 0:
            out.append(
                error(
                    "eval_steps",
                    f"--dynamic_data_selection {d} needs {{flag}} > 0",
                    "the weights are updated at each evaluation",
                )
            )
        return out


SECTIONS = {
    "train": TrainConfig,
    "moe": MoETrainConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
}


def _field_parser(cls, f: dataclasses.Field):
    """(parse function, is_bool) for field f of dataclass cls."""
    if "parse" in f.metadata:
        return f.metadata["parse"], False
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = (
        args[0] if typing.get_origin(hint) in (Union, types.UnionType) and len(args) == 1 else hint
    )
    if base is bool:
        return parse_bool, True
    if base in (int, float, str):
        return base, False
    raise TypeError(f"{cls.__name__}.{f.name}: no flag parser for {hint}")


def _all_fields():
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield sec, cls, f


FLAG_NAMES.update({f.name: f.metadata["flag"] for _, _, f in _all_fields() if "flag" in f.metadata})
spell_flag = underscore_flag  # --flag as the trainer and `megamoe check` print it


def flag_of(knob: str) -> str:
    """The user-facing flag name of a knob (the guide's spelling), without dashes."""
    return FLAG_NAMES.get(knob, knob)


# every name a config file or flag may use for a knob: its flag and its internal name
_KNOB_OF = {
    **{f.name: f.name for _, _, f in _all_fields()},
    **{v: k for k, v in FLAG_NAMES.items()},
}


def _convert(cls, f, value, origin: str):
    if value is None:
        return None
    parse, _ = _field_parser(cls, f)
    try:
        v = parse(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{origin}{spell_flag(f.name)} {value!r}: {e}") from None
    choices = f.metadata.get("choices")
    if choices and v not in choices:
        raise ConfigError(f"{origin}{spell_flag(f.name)} {v!r}: choose one of {', '.join(choices)}")
    return v


def build_parser(prog: str = "python -m megamoe.train") -> FlagParser:
    p = FlagParser(
        prog=prog,
        description="Continual pre-training of LLaMA / LLaMA-MoE on megatron-core. Flags follow "
        "the LLaMA-MoE training guide (each also in its '-' spelling); a YAML/JSON --config file "
        "may give the same keys (flat, or under train/moe/data/optim/parallel) and flags "
        "override it.",
    )
    p.add_argument("--config", help="YAML or JSON file of flag values")
    p.add_argument(
        "--local_rank", dest="local_rank", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )  # torch.distributed.launch / deepspeed pass it
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(sec, (cls.__doc__ or "").strip())
        for f in dataclasses.fields(cls):
            _, is_bool = _field_parser(cls, f)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if isinstance(default, list):
                default = ",".join(str(x) for x in default)
            help_ = f.metadata.get("help", "") + (
                "" if default in (None, "") else f" (default: {default})"
            )
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_.replace("%", "%%"))
            if is_bool:
                kw.update(nargs="?", const="true", metavar="BOOL")
            if f.metadata.get("choices"):
                kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
            elif not is_bool:
                kw["metavar"] = flag_of(f.name).upper()
            g.add_argument(spell_flag(f.name), **kw)
    return p


def load_config_file(path: str) -> dict:
    """A YAML/JSON file -> {knob: value} (flat; sections are flattened)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml/json syntax errors, undecodable bytes
        raise ConfigError(f"--config {path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return _flatten(data, f"--config {path}:")


def _flatten(data: dict, origin: str) -> dict:
    """{knob: value} from a flat or sectioned mapping whose keys are flags (either spelling)
    or knob names."""
    flat: dict = {}
    for k, v in data.items():
        k = str(k).lstrip("-")
        if k in SECTIONS and isinstance(v, dict):
            for kk, vv in v.items():
                flat[str(kk).lstrip("-")] = vv
        else:
            flat[k] = v
    out, unknown = {}, []
    for k, v in flat.items():
        knob = _KNOB_OF.get(k) or _KNOB_OF.get(k.replace("-", "_"))
        if knob is None:
            unknown.append(k)
        else:
            out[knob] = v
    if unknown:
        raise ConfigError(f"{origin} unknown key(s) {sorted(unknown)}")
    return out


def parse_run_config(argv: list | None = None, config: dict | None = None) -> RunConfig:
    """Flags (and a --config file, or the dict `config`) -> RunConfig; flags win. Raises
    ConfigError on a bad value or unknown key; argparse exits (code 2) on unknown flags."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    values: dict = {}
    origin: dict = {}
    cfg_file = ns.pop("config", None)
    ns.pop("local_rank", None)
    sources = []
    if config:
        sources.append((_flatten(dict(config), "config:"), "config:"))
    if cfg_file:
        sources.append((load_config_file(cfg_file), f"--config {cfg_file}:"))
    sources.append((ns, "flag"))
    for vals, where in sources:
        for k, v in vals.items():
            values[k], origin[k] = v, where
    run = RunConfig()
    for sec, cls, f in _all_fields():
        if f.name in values:
            where = origin[f.name]
            setattr(
                getattr(run, sec),
                f.name,
                _convert(cls, f, values[f.name], "" if where == "flag" else where + " "),
            )
    return run
