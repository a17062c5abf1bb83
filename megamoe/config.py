"""Run configuration: one dataclass per concern; the command-line flags are generated from them.

Flag names are the LLaMA-MoE training guide's (``--num_selects``, ``--gate_balance_loss_weight``,
``--moe_calculator_score_scale_factor``, ``--dynamic_data_selection`` ...), so scripts written for
the published trainer read the same. A YAML/JSON file may give the same keys; flags override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union


@dataclass
class ModelConfig:
    """LLaMA shapes (HF LlamaConfig names)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None = num_attention_heads (no GQA)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible "
                             f"by num_key_value_heads {self.kv_heads}")


@dataclass
class MoEConfig:
    """LLaMA-MoE's MoE fields (HF LLaMA-MoE config names; flags in parentheses)."""

    num_experts: int = 16
    num_selects: int = 4  # top-k (--num_selects)
    # None: equal sizes intermediate_size / num_experts; else one list of sizes per layer.
    size_experts: Optional[list] = None
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
    score_scale_factor: Union[float, list, None] = None
    multiply_gate_scores: bool = True
    capacity_factor: float = 1.25  # SwitchBalancedGate with drop_tokens
    drop_tokens: bool = False

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

    def validate(self, model: ModelConfig) -> None:
        e, k = self.num_experts, self.num_selects
        if k < 1 or k > e:
            raise ValueError(f"--num_selects {k} must be between 1 and the number of experts {e}")
        if self.gate_type not in ("TopKBalancedNoisyGate", "SwitchBalancedGate"):
            raise ValueError(f"--gate_type {self.gate_type!r}: choose TopKBalancedNoisyGate or "
                             "SwitchBalancedGate")
        if self.gate_type == "SwitchBalancedGate" and k != 1:
            raise ValueError("SwitchBalancedGate routes each token to one expert: set --num_selects 1")
        if self.gate_network not in ("mlp", "linear"):
            raise ValueError(f"--gate_network_type {self.gate_network!r}: choose mlp or linear")
        if self.gate_load_rule not in ("shazeer", "published"):
            raise ValueError(f"gate_load_rule {self.gate_load_rule!r}: choose shazeer or published")
        layers = model.num_hidden_layers
        if self.size_experts is None:
            if model.intermediate_size % e:
                raise ValueError(f"intermediate_size {model.intermediate_size} is not divisible by "
                                 f"num_experts {e}: give size_experts or another expert count")
        else:
            if len(self.size_experts) != layers or any(len(s) != e for s in self.size_experts):
                raise ValueError(f"size_experts must hold {layers} lists of {e} sizes")
        if isinstance(self.score_scale_factor, (list, tuple)) and len(self.score_scale_factor) != layers:
            raise ValueError(f"score_scale_factor has {len(self.score_scale_factor)} values for "
                             f"{layers} layers")


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
# The training run: one dataclass per concern; `build_parser` turns their fields into flags.
#
# Every field becomes `--<field name>` (the training guide's names); `metadata["help"]` is its
# help text, `metadata["choices"]` its allowed values, `metadata["parse"]` a parser for values
# that are not plain int/float/str/bool. A boolean flag given bare (`--bf16`) means true;
# `--bf16 false` also works. Fields whose default is None are "not given" (inferred, or taken
# from the pretrained checkpoint).

def _h(help: str, **extra) -> dict:
    return {"help": help, **extra}


def parse_float_or_list(text) -> Union[float, list]:
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
    except ValueError:
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


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class TrainConfig:
    """What to train, where outputs go, how long, and what is logged and saved."""

    model_type: str = field(default="llama_moe", metadata=_h(
        "llama (dense) or llama_moe", choices=("llama", "llama_moe")))
    pretrained_model: Optional[str] = field(default=None, metadata=_h(
        "a megamoe checkpoint directory, or a Hugging Face LLaMA / LLaMA-MoE directory "
        "(converted on the fly into <output_dir>/pretrained-*)"))
    tokenizer_model: Optional[str] = field(default=None, metadata=_h(
        "sentencepiece tokenizer.model (checked against the vocabulary; copied into HF exports)"))
    output_dir: Optional[str] = field(default=None, metadata=_h(
        "checkpoints (checkpoint-<step>/), tensorboard (runs/<logging-dir>/) and logs"))
    logging_dir: Optional[str] = field(default=None, metadata=_h(
        "tensorboard directory (default <output_dir>/runs/<Mon>DD_HH-MM-SS_<hostname>)"))
    training_mode: str = field(default="fpt", metadata=_h(
        "fpt (full-parameter training) or lora (adapters only)", choices=("fpt", "lora")))
    lora_rank: int = field(default=8, metadata=_h("LoRA rank r"))
    lora_alpha: float = field(default=32.0, metadata=_h("LoRA alpha (the update is scaled by alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_h("dropout on the LoRA branch's input"))
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS), metadata=_h(
        "comma-separated modules that get adapters: q,k,v,o (attention) and gate,up,down (the "
        "dense MLP or every expert)", parse=parse_str_list))
    lora_train_gates: bool = field(default=True, metadata=_h(
        "LoRA mode, llama_moe: also train the MoE gates (the rest stays frozen)"))
    max_steps: Optional[int] = field(default=None, metadata=_h(
        "optimizer steps to train (give this or --max_tokens)"))
    max_tokens: Optional[int] = field(default=None, metadata=_h(
        "tokens to train on, e.g. 100B; max_steps = max_tokens / #tokens per batch",
        parse=parse_count))
    eval_steps: int = field(default=0, metadata=_h(
        "evaluate on every domain's validation set every N steps (0: only at the end); "
        "dynamic data selection updates the domain weights at each evaluation"))
    eval_at_start: bool = field(default=False, metadata=_h("also evaluate before the first step"))
    logging_steps: int = field(default=5, metadata=_h("console line and tensorboard every N steps"))
    save_steps: int = field(default=1000, metadata=_h(
        "checkpoint every N steps (0: only at the end); always one at the end"))
    exit_interval: Optional[int] = field(default=None, metadata=_h(
        "save and exit (code 0) after a step that is a multiple of this, keeping the schedule of "
        "--max_steps: run the same command to go on (Megatron's --exit-interval; fixed-length "
        "allocations)"))
    save_total_limit: Optional[int] = field(default=None, metadata=_h(
        "keep only the newest N checkpoints (default: keep all)"))
    seed: int = field(default=1227, metadata=_h("seed of the model-side RNG and the data order"))
    bf16: bool = field(default=False, metadata=_h(
        "bf16 parameters with fp32 main parameters in the optimizer (GPUs); on CPU, fp32 "
        "parameters with bf16 autocast"))
    gradient_checkpointing: bool = field(default=False, metadata=_h(
        "activation recomputation (full, every layer)"))
    peak_tflops: Optional[float] = field(default=None, metadata=_h(
        "peak TFLOP/s of one device for MFU (default: 989 on H100/H200 in bf16, the device's "
        "spec where known, a nominal 1 on CPU)"))
    resume: bool = field(default=True, metadata=_h(
        "resume from the newest complete checkpoint in --output_dir (false: refuse to start "
        "when one exists)"))
    load_optimizer: bool = field(default=True, metadata=_h(
        "on resume, load the optimizer state; false: the weights, data position, schedule and "
        "counters only, with fresh Adam moments (Megatron's --no-load-optim; a way on when the "
        "saved optimizer state cannot be read)"))
    export_hf: bool = field(default=False, metadata=_h(
        "at the end, export the final model (LoRA merged) to <output_dir>/hf in Hugging Face "
        "format"))
    comment: str = field(default="", metadata=_h("free text recorded in the logs and checkpoints"))


@dataclass
class MoETrainConfig:
    """LLaMA-MoE flags of the guide. None: keep the pretrained checkpoint's value."""

    num_experts: Optional[int] = field(default=None, metadata=_h(
        "experts per layer when --pretrained_model is a dense HF LLaMA converted on the fly "
        "(default 16); must match a LLaMA-MoE checkpoint"))
    num_selects: Optional[int] = field(default=None, metadata=_h(
        "top-k: experts each token is routed to (default: the checkpoint's, 4 for a conversion)"))
    moe_calculator_score_scale_factor: Union[float, list, None] = field(default=None, metadata=_h(
        "scale factor SF on the experts' output, normally #experts / #selected; one number or "
        "one per layer (comma separated)", parse=parse_float_or_list))
    gate_balance_loss_weight: Optional[float] = field(default=None, metadata=_h(
        "weight of the balance loss (default: the checkpoint's, 1e-2)"))
    gate_type: Optional[str] = field(default=None, metadata=_h(
        "TopKBalancedNoisyGate or SwitchBalancedGate",
        choices=("TopKBalancedNoisyGate", "SwitchBalancedGate")))
    gate_network_type: Optional[str] = field(default=None, metadata=_h(
        "mlp or linear (for a conversion; a checkpoint keeps its own)", choices=("mlp", "linear")))
    gate_add_noise: Optional[bool] = field(default=None, metadata=_h("noisy top-k in training"))
    gate_load_rule: Optional[str] = field(default=None, metadata=_h(
        "shazeer or published", choices=("shazeer", "published")))
    multiply_gate_scores: Optional[bool] = field(default=None, metadata=_h(
        "weight the experts' outputs by the gate scores (and SF)"))
    split_seed: int = field(default=0, metadata=_h(
        "conversion on the fly: seed of the random expert split and gate initialisation"))


@dataclass
class DataConfig:
    """Multi-domain training data, validation sets and the domain weights."""

    dataset_dir: Optional[str] = field(default=None, metadata=_h(
        "one folder per domain of *_document.bin/.idx (tools/preprocess_data.py output)"))
    validation_dir: Optional[str] = field(default=None, metadata=_h(
        "per-domain validation sets (<domain>/*_document.idx or <domain>_<key>_document.idx)"))
    block_size: int = field(default=2048, metadata=_h("tokens per training sample"))
    per_device_train_batch_size: int = field(default=8, metadata=_h("micro-batch size per data-parallel rank"))
    per_device_eval_batch_size: Optional[int] = field(default=None, metadata=_h(
        "evaluation micro-batch (default: the training one)"))
    gradient_accumulation_steps: int = field(default=1, metadata=_h("micro-batches per step"))
    dynamic_data_selection: str = field(default="none", metadata=_h(
        "none (static weights), sheared_llama or sheared_llama_paper",
        choices=("none", "sheared_llama", "sheared_llama_paper")))
    prob_map: Optional[str] = field(default=None, metadata=_h(
        "initial domain weights: llama, sheared_llama, uniform or a json file {domain: weight} "
        "(default sheared_llama for the SlimPajama domains, else uniform)"))
    ref_loss: str = field(default="llama2_7b", metadata=_h(
        "dynamic selection's reference losses: llama2_7b, sheared_llama_2.7b or a json file"))
    dds_eta: float = field(default=1.0, metadata=_h("sheared_llama update step size"))
    dds_c: float = field(default=1e-4, metadata=_h("sheared_llama smoothing towards uniform"))
    max_eval_blocks: Optional[int] = field(default=None, metadata=_h(
        "evaluate on at most N blocks per domain (default all)"))


@dataclass
class OptimConfig:
    """AdamW, gradient clipping and the learning-rate schedule."""

    learning_rate: float = field(default=2e-4, metadata=_h("peak learning rate"))
    final_lr_portion: float = field(default=0.0, metadata=_h(
        "floor of the cosine decay, as a fraction of the peak"))
    warmup_steps: int = field(default=0, metadata=_h("linear warmup steps"))
    weight_decay: float = field(default=0.1, metadata=_h("AdamW weight decay (not on norms and biases)"))
    adam_beta1: float = field(default=0.9, metadata=_h("AdamW beta1"))
    adam_beta2: float = field(default=0.95, metadata=_h("AdamW beta2"))
    adam_epsilon: float = field(default=1e-8, metadata=_h("AdamW epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=_h("clip the global gradient norm (0: off)"))
    use_distributed_optimizer: Optional[bool] = field(default=None, metadata=_h(
        "shard the optimizer state over data-parallel ranks (ZeRO-1; default: on with CUDA)"))
    optimizer_checkpoint_format: str = field(default="fully_reshardable", metadata=_h(
        "how the distributed optimizer's state is saved: fully_reshardable (resumes at any "
        "TP/PP/EP/DP layout; gathers each model-parallel shard's state over DP while saving) "
        "or dp_reshardable (faster saves, no gathering; resumes at the same TP/PP/EP layout, "
        "any DP size)", choices=("fully_reshardable", "dp_reshardable")))


@dataclass
class ParallelConfig:
    """Processes and how the model is split over them."""

    num_nodes: Optional[int] = field(default=None, metadata=_h(
        "nodes (checked against the world size; default: inferred from torchrun)"))
    num_gpu_per_node: Optional[int] = field(default=None, metadata=_h(
        "processes (GPUs) per node (checked; default: torchrun's LOCAL_WORLD_SIZE)"))
    tensor_model_parallel_size: int = field(default=1, metadata=_h("TP"))
    pipeline_model_parallel_size: int = field(default=1, metadata=_h("PP"))
    expert_model_parallel_size: int = field(default=1, metadata=_h("EP"))
    sequence_parallel: Optional[bool] = field(default=None, metadata=_h(
        "sequence parallelism (default: on when TP > 1, which LLaMA-MoE requires)"))
    overlap_grad_reduce: bool = field(default=False, metadata=_h(
        "reduce gradients over data-parallel ranks in buckets while the last micro-batch's backward "
        "still runs (Megatron's --overlap-grad-reduce; megatron-core's DDP)"))
    ddp_bucket_size: Optional[int] = field(default=None, metadata=_h(
        "parameters per gradient bucket with --overlap_grad_reduce (default: megatron-core's, "
        "max(40M, 1M x DP))"))
    overlap_param_gather: bool = field(default=False, metadata=_h(
        "with the distributed optimizer, all-gather the updated parameters during the next forward "
        "pass instead of at the end of the step (Megatron's --overlap-param-gather; measured at DP=2 "
        "on NVLink: within noise, benchmarks/RESULTS.md)"))
    ep_overlap_chunks: int = field(default=1, metadata=_h(
        "EP > 1: split each MoE layer's tokens into this many chunks whose all-to-alls overlap the "
        "other chunks' expert GEMMs (1: off; measured at EP=2: slower, its extra local work costs "
        "more than it hides, benchmarks/RESULTS.md)"))
    tp_comm_overlap: bool = field(default=False, metadata=_h(
        "TP > 1 with sequence parallelism: overlap the attention's sequence-parallel all-gather / "
        "reduce-scatter with its GEMMs (measured at TP=2: within noise, benchmarks/RESULTS.md)"))


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def flat(self) -> dict:
        """{flag name: value} over all sections."""
        return {k: v for sec in SECTIONS for k, v in to_dict(getattr(self, sec)).items()}


SECTIONS = {"train": TrainConfig, "moe": MoETrainConfig, "data": DataConfig,
            "optim": OptimConfig, "parallel": ParallelConfig}


class ConfigError(ValueError):
    """A bad flag or config-file value; the message names it."""


def _field_parser(cls, f: dataclasses.Field):
    """(parse function, is_bool) for field f of dataclass cls."""
    if "parse" in f.metadata:
        return f.metadata["parse"], False
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is Union and len(args) == 1 else hint
    if base is bool:
        return parse_bool, True
    if base in (int, float, str):
        return base, False
    raise TypeError(f"{cls.__name__}.{f.name}: no flag parser for {hint}")


def _all_fields():
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield sec, cls, f


def _convert(cls, f, value, origin: str):
    if value is None:
        return None
    parse, _ = _field_parser(cls, f)
    try:
        v = parse(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{origin} --{f.name} {value!r}: {e}") from None
    choices = f.metadata.get("choices")
    if choices and v not in choices:
        raise ConfigError(f"{origin} --{f.name} {v!r}: choose one of {', '.join(choices)}")
    return v


def build_parser(prog: str = "python -m megamoe.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Continual pre-training of LLaMA / LLaMA-MoE on megatron-core. Flags follow "
        "the LLaMA-MoE training guide; a YAML/JSON --config file may give the same keys (flat, "
        "or under train/moe/data/optim/parallel) and flags override it.")
    p.add_argument("--config", help="YAML or JSON file of flag values")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # torch.distributed.launch / deepspeed pass it
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(sec, (cls.__doc__ or "").strip())
        for f in dataclasses.fields(cls):
            _, is_bool = _field_parser(cls, f)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if isinstance(default, list):
                default = ",".join(str(x) for x in default)
            help_ = f.metadata.get("help", "") + ("" if default in (None, "") else f" (default: {default})")
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_.replace("%", "%%"))
            if is_bool:
                kw.update(nargs="?", const="true", metavar="BOOL")
            if f.metadata.get("choices"):
                kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
            g.add_argument(f"--{f.name}", **kw)
    return p


def load_config_file(path: str) -> dict:
    """A YAML/JSON file -> {flag name: value} (flat; sections are flattened)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml/json syntax errors
        raise ConfigError(f"--config {path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return _flatten(data, f"--config {path}:")


def _flatten(data: dict, origin: str) -> dict:
    flat: dict = {}
    for k, v in data.items():
        k = str(k).lstrip("-")
        if k in SECTIONS and isinstance(v, dict):
            for kk, vv in v.items():
                flat[str(kk).lstrip("-")] = vv
        else:
            flat[k] = v
    known = {f.name for _, _, f in _all_fields()}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"{origin} unknown key(s) {unknown}")
    return flat


def parse_run_config(argv: Optional[list] = None, config: Optional[dict] = None) -> RunConfig:
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
            setattr(getattr(run, sec), f.name, _convert(cls, f, values[f.name], origin[f.name]))
    return run


def parse_flat(argv=(), config: Optional[dict] = None) -> dict:
    """{flag name: value} over every flag (defaults included), from flags and/or a dict of
    config keys (flat or by section; flags win). For tools that inspect a run's settings
    (megamoe check); raises ConfigError / argparse's SystemExit like the trainer."""
    return parse_run_config(list(argv), config).flat()


def run_config_from_dict(data: dict) -> RunConfig:
    """The inverse of to_dict(RunConfig) (as stored in checkpoints)."""
    run = RunConfig()
    for sec, cls in SECTIONS.items():
        if sec in data:
            setattr(run, sec, from_dict(cls, data[sec]))
    return run


def to_argv(run: RunConfig) -> list:
    """Flags that reproduce `run` (values that differ from the defaults)."""
    out = []
    default = RunConfig()
    for sec, cls, f in _all_fields():
        v, d = getattr(getattr(run, sec), f.name), getattr(getattr(default, sec), f.name)
        if v == d or v is None:
            continue
        if isinstance(v, list):
            v = ",".join(str(x) for x in v)
        out += [f"--{f.name}", str(v)]
    return out
