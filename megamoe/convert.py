"""Checkpoint conversion between Hugging Face LLaMA / LLaMA-MoE and megamoe (README: Checkpoints).

    hf-to-megamoe   HF LLaMA (dense) -> megamoe llama, or -> megamoe llama_moe by expert
                    construction (moefy/: random | clustering | graph | gradient split);
                    HF LLaMA-MoE (config model_type llama_moe) -> megamoe llama_moe
    megamoe-to-hf   megamoe llama -> HF LlamaForCausalLM; megamoe llama_moe -> HF LLaMA-MoE

Everything runs in one process on CPU: a world of one (gloo) with megatron-core's groups of size
one. Neither direction holds the model: its checkpoint layout comes from the model built on the
meta device, and the tensors stream through one layer at a time (formats/mcore_stream.py: HF
tensors -> megamoe tensors -> the dist_checkpointing files, and back), so memory stays at about
one layer plus the embeddings and the HF output shard being filled. The graph and gradient splits
are the exception: they run the dense model over sample text. Loading a megamoe checkpoint at any
TP/PP/EP layout reshards it, so one converted checkpoint serves every layout; the layout flags of
hf-to-megamoe only check that the model can be split that way. Outputs are written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, parallel
from .command import FlagParser, run_command
from .config import GATE_NETWORKS, GATE_TYPES, ModelConfig, MoEConfig, parse_float_or_list
from .findings import ConfigError, Finding, dash_flag, raise_errors
from .formats import hf_config as hfc
from .formats.hf_files import HFWeights, ShardedSafetensorsWriter, parse_size
from .formats.hf_llama import hf_to_megamoe as _hf_to_mg
from .formats.hf_llama import megamoe_to_hf as _mg_to_hf
from .moefy import io as split_io
from .moefy.split import SplitError, random_split, resolve_sizes, slice_ffn
from .outputs import check_output, publish_dir, staging_dir

SPLIT_METHODS = ("random", "clustering", "graph", "gradient")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(ConfigError):
    """Bad input for a conversion; the message names the file/flag/value and what to do."""

    def __init__(self, findings, spell=dash_flag):
        super().__init__(findings, spell)


def _refuse(findings: list[Finding]) -> list[Finding]:
    """Raise on errors (flags spelled as this tool's users type them); return the warnings."""
    return raise_errors(findings, dash_flag, ConvertError)


def _warn(findings: list[Finding]) -> None:
    for f in findings:
        print(f"convert: warning: {f.text(dash_flag)}", file=sys.stderr)


def _world1(seed: int) -> None:
    try:
        parallel.world_of_one(seed)
    except RuntimeError as e:
        raise ConvertError(str(e)) from None


class _Progress:
    """A tqdm bar advancing by one for each layer seen in a stream of names."""

    _layer = re.compile(r"layers\.(\d+)\.")

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr)
        self.last = None

    def wrap(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in items:
            m = self._layer.search(name)
            if m and m.group(1) != self.last:
                if self.last is not None:
                    self.update()
                self.last = m.group(1)
            yield name, t
        if self.last is not None:
            self.update()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# HF shapes and streaming into a model


def hf_shapes(m: ModelConfig, moe: MoEConfig | None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the model and its shape implied by the config."""
    d, v, f = m.hidden_size, m.vocab_size, m.intermediate_size
    q, kv = m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    s = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(m.num_hidden_layers):
        p = f"model.layers.{i}."
        s.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
            }
        )
        if moe is None:
            s.update(
                {
                    p + "mlp.gate_proj.weight": (f, d),
                    p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f),
                }
            )
            continue
        e = moe.num_experts
        if moe.gate_network == "mlp":
            s[p + "mlp.gate.gate_network.0.weight"] = (e, d)
            s[p + "mlp.gate.gate_network.2.weight"] = (e, e)
        else:
            s[p + "mlp.gate.gate_network.weight"] = (e, d)
        if moe.gate_type == "TopKBalancedNoisyGate":
            s[p + "mlp.gate.weight_noise.weight"] = (e, d)
        for j, size in enumerate(moe.expert_sizes(i, f)):
            ex = p + "mlp.calculator.experts."
            s[f"{ex}weight_gate.{j}"] = (size, d)
            s[f"{ex}weight_up.{j}"] = (size, d)
            s[f"{ex}weight_down.{j}"] = (d, size)
    return s


def _checked_getter(
    weights: HFWeights, shapes: dict, tie_embeddings: bool, config_path: str
) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        src = name
        if name == "lm_head.weight" and name not in weights and tie_embeddings:
            src = "model.embed_tokens.weight"  # tied: the untied megamoe model gets a copy
        if src not in weights:
            raise ConvertError(
                f"{weights.dir}: tensor {src} is missing from the {weights.kind} "
                f"weights, but {config_path} implies it; are the files complete "
                "and of the model_type in config.json?"
            )
        t = weights.get(src)
        want = shapes.get(name)
        if want is not None and tuple(t.shape) != want:
            raise ConvertError(
                f"{weights.file_of(src)}: tensor {src} has shape {list(t.shape)}, "
                f"but {config_path} implies {list(want)}; the config and the "
                "weights disagree"
            )
        if not t.is_floating_point():
            raise ConvertError(f"{weights.file_of(src)}: tensor {src} has dtype {t.dtype}")
        return t

    return get


def _load_stream(model: torch.nn.Module, items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy (megamoe name, tensor) pairs into the model's parameters (the dense model that the
    graph and gradient splits run); every parameter must be set."""
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, t in items:
            p = params.get(name)
            if p is None:
                raise ConvertError(f"internal: no parameter {name} in the megamoe model")
            if tuple(p.shape) != tuple(t.shape):
                raise ConvertError(
                    f"{name}: shape {list(t.shape)} does not fit the model's {list(p.shape)}"
                )
            p.copy_(t)
            seen.add(name)
    unset = [n for n in params if n not in seen]
    if unset:
        raise ConvertError(f"internal: parameters not set from the source: {unset[:5]}")


# --------------------------------------------------------------------------------------------
# splits


@dataclass
class SplitOptions:
    method: str = "random"
    seed: int = 0
    expert_sizes: list[int] | None = None  # per expert, same for every layer
    split_file: str | None = None  # reuse a split directory (or checkpoint with split/)
    # clustering
    metric: str = "l2"
    key: str = "up"  # rows of up_proj or gate_proj
    # graph / gradient: sample text
    data: list[str] = field(default_factory=list)  # indexed dataset prefixes
    tokens: torch.Tensor | None = None  # API alternative to `data`: int64 [N, L]
    samples: int = 64
    seq_length: int = 256
    batch_size: int = 8
    graph_active_fraction: float = 0.1
    graph_threshold: float = 0.0
    gradient_variant: str = "non-sharing"


def compute_splits(
    opts: SplitOptions,
    m: ModelConfig,
    num_experts: int | None,
    get: Callable[[str], torch.Tensor],
    dense_model: Callable[[], torch.nn.Module],
    progress: bool = True,
) -> tuple[list[list[np.ndarray]], list[dict]]:
    """Per layer: the experts' neuron ids and the info recorded in the split file."""
    f, layers = m.intermediate_size, m.num_hidden_layers
    if opts.split_file:
        return split_io.read_splits(opts.split_file, layers, f, num_experts)
    if opts.method not in SPLIT_METHODS:
        raise ConvertError(f"--split {opts.method!r}: choose one of {SPLIT_METHODS}")
    e = num_experts
    partition = not (opts.method == "gradient" and opts.gradient_variant == "sharing-inner")
    sizes = resolve_sizes(f, e, opts.expert_sizes, partition=partition)
    info = {"method": opts.method, "seed": opts.seed}
    bar = _Progress(layers, f"split ({opts.method})", progress)
    splits: list[list[np.ndarray]] = []
    if opts.method == "random":
        for i in range(layers):
            splits.append(random_split(f, e, opts.seed + i, sizes))
            bar.update()
    elif opts.method == "clustering":
        from .moefy.clustering import clustering_split

        if opts.key not in ("up", "gate"):
            raise ConvertError(f"--split-key {opts.key!r}: choose up or gate")
        info.update(metric=opts.metric, key=f"{opts.key}_proj")
        for i in range(layers):
            w = get(f"model.layers.{i}.mlp.{opts.key}_proj.weight")
            splits.append(clustering_split(w, e, opts.metric, opts.seed + i, sizes))
            bar.update()
    else:
        from .moefy import activations

        model = dense_model()
        tokens = opts.tokens
        if tokens is None:
            tokens = activations.sample_token_windows(
                opts.data, opts.samples, opts.seq_length, opts.seed, m.vocab_size
            )
        elif int(tokens.max()) >= m.vocab_size or int(tokens.min()) < 0:
            raise ConvertError(f"sample tokens outside the vocabulary [0, {m.vocab_size})")
        info.update(
            samples=int(tokens.shape[0]), seq_length=int(tokens.shape[1]), data=list(opts.data)
        )
        if opts.method == "graph":
            from .moefy.graph import graph_split

            info.update(active_fraction=opts.graph_active_fraction, threshold=opts.graph_threshold)
            counters = activations.coactivation_counters(
                model, tokens, opts.batch_size, opts.graph_active_fraction
            )
            del model
            for i in range(layers):
                a = counters[i].matrix()
                counters[i] = None
                splits.append(graph_split(a, e, opts.seed + i, opts.graph_threshold, sizes))
                bar.update()
        else:
            from .moefy.gradient import gradient_split

            info.update(variant=opts.gradient_variant)
            clusters = activations.cluster_sequences(model, tokens, e, opts.seed)
            scores = activations.gradient_importance(model, tokens, clusters, e, opts.batch_size)
            del model
            for i in range(layers):
                splits.append(gradient_split(scores[i], opts.gradient_variant, sizes))
                bar.update()
    bar.close()
    return splits, [dict(info) for _ in range(layers)]


# --------------------------------------------------------------------------------------------
# hf-to-megamoe


def validate_layout(
    m: ModelConfig, num_experts: int | None, tp: int = 1, pp: int = 1, ep: int = 1
) -> None:
    """Check that the model (num_experts None: dense) can be split at this TP/PP/EP layout (the
    checkpoint itself is layout-free: loading reshards)."""
    _refuse(parallel.ParallelLayout(tp, pp, ep, sequence_parallel=tp > 1).check(m, num_experts))


def hf_to_megamoe(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    model_type: str | None = None,
    num_experts: int | None = None,
    num_selects: int | None = None,
    gate_network: str | None = None,
    gate_type: str | None = None,
    score_scale_factor=None,
    split: SplitOptions | None = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert an HF LLaMA or LLaMA-MoE directory into a megamoe checkpoint at `output`."""
    split = split or SplitOptions()
    hf_dir, output = Path(hf_dir), Path(output)
    cfg = hfc.read_config_json(hf_dir)
    cfg_path = str(hf_dir / hfc.CONFIG)
    m = hfc.model_config_from_hf(cfg, cfg_path)
    src_type = cfg["model_type"]
    model_type = model_type or src_type
    if model_type not in ("llama", "llama_moe"):
        raise ConvertError(f"--model-type {model_type!r}: choose llama or llama_moe")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    try:
        sf = None if score_scale_factor is None else parse_float_or_list(score_scale_factor)
    except ValueError as e:
        raise ConvertError(f"--moe-calculator-score-scale-factor {e}") from None
    if src_type == "llama_moe" and model_type == "llama":
        raise ConvertError(
            f"{cfg_path} is a LLaMA-MoE model; convert it with --model-type "
            "llama_moe (merging experts back into a dense FFN is not supported)"
        )
    moe: MoEConfig | None = None
    src_moe: MoEConfig | None = None
    given = dict(
        num_experts=num_experts,
        num_selects=num_selects,
        gate_network=gate_network,
        gate_type=gate_type,
        score_scale_factor=sf,
    )
    if src_type == "llama_moe":
        src_moe = hfc.moe_config_from_hf(cfg, m, cfg_path)
        if split.split_file or split.method != "random" or split.expert_sizes:
            raise ConvertError(
                "--split, --split-file and --expert-sizes construct experts from a "
                f"dense LLaMA; {hf_dir} already is a LLaMA-MoE model"
            )
        moe, found = src_moe.with_overrides(**given)  # the flags override the checkpoint's values
        _warn(_refuse(found + moe.check(m)))
    elif model_type == "llama_moe":
        if num_experts is None and not split.split_file:
            raise ConvertError(
                "--num-experts is required to construct a LLaMA-MoE from a dense "
                "LLaMA (or give --split-file)"
            )
        if num_selects is None:
            raise ConvertError("--num-selects (top-k) is required to construct a LLaMA-MoE")
        if num_experts is not None:  # E, K and the gate, before any expensive work
            _refuse(MoEConfig(**{k: v for k, v in given.items() if v is not None}).check())
    else:
        flags = [dash_flag(k) for k, v in given.items() if v is not None]
        flags += ["--split-file"] if split.split_file else []
        if flags:
            raise ConvertError(f"{flags} apply to --model-type llama_moe only")

    layout = (tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size)
    if model_type == "llama" or moe is not None or num_experts is not None:  # E known
        validate_layout(m, moe.num_experts if moe else num_experts, *layout)
    check_output(
        output,
        [("--hf-dir", hf_dir), ("--split-file", split.split_file)]
        + [("--split-data", d) for d in split.data],
        overwrite,
    )

    weights = HFWeights(hf_dir)
    from .formats import mcore_stream  # megatron-core: imported once the input looks right
    from .model.llama import build_model

    tie = bool(cfg.get("tie_word_embeddings", False))
    seed = split.seed
    _world1(seed)
    torch_dtype = DTYPES[dtype]
    extra = {
        "source": os.path.abspath(hf_dir),
        "source_model_type": src_type,
        "layout_checked": {
            "tensor_model_parallel_size": tensor_model_parallel_size,
            "pipeline_model_parallel_size": pipeline_model_parallel_size,
            "expert_model_parallel_size": expert_model_parallel_size,
        },
    }
    dense_get = _checked_getter(weights, hf_shapes(m, None), tie, cfg_path)
    splits = infos = None

    if model_type == "llama_moe" and src_type == "llama":

        def dense_model():
            model = build_model(m)
            _load_stream(model, _hf_to_mg(dense_get, m))
            return model

        try:
            splits, infos = compute_splits(split, m, num_experts, dense_get, dense_model, progress)
        except SplitError as err:
            raise ConvertError(str(err)) from None
        e = len(splits[0])
        if num_experts is not None and e != num_experts:
            raise ConvertError(
                f"--split-file has {e} experts per layer, --num-experts {num_experts}"
            )
        sizes = [[len(s) for s in layer] for layer in splits]
        equal = m.intermediate_size % e == 0 and all(
            s == m.intermediate_size // e for layer in sizes for s in layer
        )
        kw = {}
        if gate_type is not None:
            kw["gate_type"] = gate_type
        moe = MoEConfig(
            num_experts=e,
            num_selects=num_selects,
            gate_network=gate_network or "mlp",
            score_scale_factor=sf,
            size_experts=None if equal else sizes,
            **kw,
        )
        _warn(_refuse(moe.check(m)))
        extra.update(
            split=infos[0].get("method", split.method),
            split_seed=infos[0].get("seed", split.seed),
            split_dir=split_io.SPLIT_DIR,
        )
        if split.split_file:
            extra["split_file"] = str(Path(split.split_file).resolve())
    validate_layout(m, moe.num_experts if moe else None, *layout)

    _world1(seed)
    if moe is None:
        items = _hf_to_mg(dense_get, m)
    elif src_moe is not None:
        moe_get = _checked_getter(weights, hf_shapes(m, src_moe), tie, cfg_path)
        items = _hf_to_mg(moe_get, m, src_moe)
    else:
        items = _with_gates(_sliced(_hf_to_mg(dense_get, m), splits), m.hidden_size, moe, seed)
    meta = checkpoint.make_meta(m, moe, **extra)
    staging = staging_dir(output, "megamoe convert hf-to-megamoe")
    try:
        bar = _Progress(m.num_hidden_layers, "hf-to-megamoe", progress)
        # the layout of build_model(m, moe, dtype) without its memory; the data is streamed
        mcore_stream.save_streaming(
            mcore_stream.meta_model(m, moe, torch_dtype), staging / "model", bar.wrap(items)
        )
        bar.close()
        _refuse_unread(weights, hf_dir, src_type)
        weights.close()
        (staging / checkpoint.META).write_text(json.dumps(meta, indent=2))
        if splits is not None:
            for i, (s, info) in enumerate(zip(splits, infos)):
                split_io.write_split(
                    staging / split_io.SPLIT_DIR, i, s, m.intermediate_size, **info
                )
        publish_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _refuse_unread(weights: HFWeights, hf_dir: Path, src_type: str) -> None:
    unread = weights.unread()
    if unread:
        raise ConvertError(
            f"{hf_dir}: tensors in the weights that the {src_type} model does not "
            f"use: {unread[:6]}{' ...' if len(unread) > 6 else ''}; refusing to "
            "drop weights silently (is config.json right for these files?)"
        )


def _with_gates(
    items: Iterable[tuple[str, torch.Tensor]], hidden: int, moe: MoEConfig, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Add each layer's newly initialised gate after its experts (a dense source has none)."""
    for name, t in items:
        yield name, t
        mm = re.match(r"decoder\.layers\.(\d+)\.mlp\.experts\.weight_down$", name)
        if mm:
            yield from _init_gate(int(mm.group(1)), hidden, moe, seed)


def _init_gate(
    layer: int, hidden: int, moe: MoEConfig, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The gate of one layer as the model initialises it (mlp: random; linear and weight_noise:
    zero), drawn from its own seed: it depends on (seed, layer) only, not on the rest of the
    model, the device or the order of construction."""
    from .model.moe.gates import build_gate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + layer) % 2**63)
        gate = build_gate(hidden, moe)
    for name, p in gate.named_parameters():
        yield f"decoder.layers.{layer}.mlp.gate.{name}", p.detach()


def _sliced(
    items: Iterable[tuple[str, torch.Tensor]], splits
) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn a dense megamoe stream into an MoE one: each layer's linear_fc1/fc2 -> experts."""
    fc1 = {}
    for name, t in items:
        mm = re.match(r"decoder\.layers\.(\d+)\.mlp\.linear_fc([12])\.weight$", name)
        if not mm:
            yield name, t
            continue
        i, which = int(mm.group(1)), mm.group(2)
        if which == "1":
            fc1[i] = t
            continue
        gate, up = fc1.pop(i).chunk(2, 0)
        wg, wu, wd = slice_ffn(gate, up, t, splits[i])
        p = f"decoder.layers.{i}.mlp.experts."
        yield p + "weight_gate", wg
        yield p + "weight_up", wu
        yield p + "weight_down", wd


# --------------------------------------------------------------------------------------------
# megamoe-to-hf

TOKENIZER_FILES = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
    r".*\.model|vocab\..*|merges\.txt|chat_template\..*)$"
)


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    if src.is_file():
        shutil.copy2(src, dst / src.name)
        return [src.name]
    if not src.is_dir():
        raise ConvertError(f"--tokenizer {src}: no such file or directory")
    names = sorted(
        p.name for p in src.iterdir() if p.is_file() and TOKENIZER_FILES.fullmatch(p.name)
    )
    if not names:
        raise ConvertError(
            f"--tokenizer {src}: no tokenizer files (tokenizer.model, "
            "tokenizer.json, tokenizer_config.json, ...) in that directory"
        )
    for n in names:
        shutil.copy2(src / n, dst / n)
    return names


def _copy_remote_code(src: Path, dst: Path) -> dict:
    """Copy the LLaMA-MoE modeling code (*.py) and return the auto_map for config.json."""
    if not src.is_dir():
        raise ConvertError(
            f"--remote-code {src}: not a directory (give the directory holding "
            "configuration_llama_moe.py and the modeling file of LLaMA-MoE)"
        )
    auto = {}
    wanted = {
        "LlamaMoEConfig": "AutoConfig",
        "LlamaMoEModel": "AutoModel",
        "LlamaMoEForCausalLM": "AutoModelForCausalLM",
    }
    for py in sorted(src.glob("*.py")):
        shutil.copy2(py, dst / py.name)
        text = py.read_text(errors="replace")
        for cls, key in wanted.items():
            if re.search(rf"^class {cls}\b", text, re.M):
                auto[key] = f"{py.stem}.{cls}"
    if "AutoConfig" not in auto or "AutoModelForCausalLM" not in auto:
        raise ConvertError(
            f"--remote-code {src}: no *.py defining LlamaMoEConfig and LlamaMoEForCausalLM"
        )
    return auto


def megamoe_to_hf(
    checkpoint_dir: str | os.PathLike,
    output: str | os.PathLike,
    fmt: str | None = None,
    tokenizer: str | None = None,
    max_shard_size: str | int = "5GB",
    dtype: str = "float32",
    remote_code: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export a megamoe checkpoint as an HF LlamaForCausalLM or LLaMA-MoE directory. A LoRA
    training checkpoint is merged first (W + alpha/r x B A), through a temporary megamoe
    checkpoint beside the output that is removed afterwards."""
    checkpoint_dir, output = Path(checkpoint_dir), Path(output)
    if not checkpoint_dir.is_dir():
        raise ConvertError(f"--checkpoint {checkpoint_dir}: no such directory")
    try:
        meta = checkpoint.read_meta(checkpoint_dir)
    except checkpoint.CheckpointError as e:
        raise ConvertError(f"--checkpoint: {e}") from None
    m, moe = checkpoint.configs_from_meta(meta)
    kind = meta.get("model_type", "llama_moe" if moe else "llama")
    fmt = fmt or kind
    if fmt not in ("llama", "llama_moe"):
        raise ConvertError(f"--format {fmt!r}: choose llama or llama_moe")
    if fmt != kind:
        raise ConvertError(
            f"--format {fmt}: {checkpoint_dir} holds a {kind} model; export it with --format {kind}"
        )
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    if remote_code and fmt != "llama_moe":
        raise ConvertError("--remote-code applies to --format llama_moe only")
    check_output(
        output,
        [
            ("--checkpoint", checkpoint_dir),
            ("--tokenizer", tokenizer),
            ("--remote-code", remote_code),
        ],
        overwrite,
    )
    if not (checkpoint_dir / "model").is_dir():
        raise ConvertError(f"--checkpoint {checkpoint_dir}: the model/ directory is missing")

    _world1(0)
    staging = staging_dir(output, "megamoe convert megamoe-to-hf")
    merged = staging / "lora-merged"  # inside the staging directory: removed with it
    try:
        if meta.get("lora"):  # the base weights alone would silently drop the trained adapters
            checkpoint_dir = merge_lora_checkpoint(checkpoint_dir, merged)
        get = _checkpoint_getter(checkpoint_dir, m, moe)
        torch_dtype = DTYPES[dtype]
        writer = ShardedSafetensorsWriter(staging, max_bytes)
        bar = _Progress(m.num_hidden_layers, "megamoe-to-hf", progress)
        for name, t in bar.wrap(_mg_to_hf(get, m, moe)):
            writer.add(name, t.to(torch_dtype))
        bar.close()
        writer.close()
        extra = {}
        if remote_code:
            extra["auto_map"] = _copy_remote_code(Path(remote_code), staging)
        cfg = (
            hfc.llama_config_dict(m, dtype, extra)
            if fmt == "llama"
            else hfc.llama_moe_config_dict(m, moe, dtype, extra)
        )
        hfc.write_config_json(staging, cfg)
        if tokenizer:
            _copy_tokenizer(Path(tokenizer), staging)
        shutil.rmtree(merged, ignore_errors=True)
        publish_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def merge_lora_checkpoint(checkpoint_dir: Path, output: Path) -> Path:
    """Load a LoRA training checkpoint with its adapters, merge them into the weights and save
    an ordinary megamoe checkpoint at `output` (a world of one)."""
    from .checkpoint import io as checkpoint_io
    from .model import lora
    from .model.llama import build_model

    meta = checkpoint.read_meta(checkpoint_dir)
    m, moe = checkpoint.configs_from_meta(meta)
    model = build_model(m, moe)
    lora.apply_lora(model, lora.LoRASpec(**meta["lora"]))
    checkpoint_io.load_model(checkpoint_dir, model)
    lora.merge_lora(model)
    keep = {k: v for k, v in meta.items() if k not in ("lora", "trainer")}
    keep["merged_from"] = str(Path(checkpoint_dir).resolve())
    checkpoint_io.save(output, model, keep)
    return output


def _checkpoint_getter(
    checkpoint_dir: Path, m: ModelConfig, moe: MoEConfig | None
) -> Callable[[str], torch.Tensor]:
    """get(megamoe name) -> full fp32 tensor (as checkpoint.load_model into build_model reads),
    loading the checkpoint a layer at a time; checked against the model of its megamoe.json."""
    from .formats import mcore_stream

    def cannot_load(e: Exception) -> ConvertError:
        return ConvertError(f"--checkpoint {checkpoint_dir}: cannot load the weights ({e})")

    try:
        reader = mcore_stream.CheckpointReader(mcore_stream.meta_model(m, moe), checkpoint_dir)
        missing = reader.missing_keys()
    except Exception as e:  # unreadable dist_checkpointing metadata
        raise cannot_load(e) from None
    if missing:
        raise ConvertError(
            f"{checkpoint_dir}: weights do not match the model (missing "
            f"{missing[:5]}): was it written for another model type?"
        )

    def get(name: str) -> torch.Tensor:
        try:
            return reader.get(name)
        except Exception as e:  # dist_checkpointing's own errors
            raise cannot_load(e) from None

    return get


# --------------------------------------------------------------------------------------------
# command line


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected integers separated by commas"
        ) from None


def build_parser(prog: str = "convert_hf_checkpoint.py") -> argparse.ArgumentParser:
    p = FlagParser(
        prog=prog,
        description="Convert between Hugging Face LLaMA / LLaMA-MoE and megamoe checkpoints.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser(
        "hf-to-megamoe",
        help="HF LLaMA or LLaMA-MoE -> megamoe checkpoint",
        description="HF LLaMA (dense) -> megamoe llama or llama_moe (expert "
        "construction); HF LLaMA-MoE -> megamoe llama_moe. The checkpoint loads "
        "at any TP/PP/EP layout (loading reshards).",
    )
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json + weights)")
    a.add_argument("--output", required=True, help="megamoe checkpoint directory to write")
    a.add_argument(
        "--model-type",
        choices=["llama", "llama_moe"],
        help="what to write (default: the HF config's model_type)",
    )
    g = a.add_argument_group("LLaMA-MoE from a dense LLaMA")
    g.add_argument("--num-experts", type=int, help="E")
    g.add_argument("--num-selects", type=int, help="K (top-k); also overrides an HF LLaMA-MoE's")
    g.add_argument(
        "--moe-calculator-score-scale-factor",
        "--score-scale-factor",
        dest="score_scale_factor",
        help="SF: one number, or one per layer comma "
        "separated (default E/K); overrides an HF LLaMA-MoE's value",
    )
    g.add_argument(
        "--split",
        choices=SPLIT_METHODS,
        default="random",
        help="expert construction method (default random, as the released models)",
    )
    g.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the split and of the gate initialisation (default 0)",
    )
    g.add_argument(
        "--split-file",
        help="reuse a split: a directory of layer_<i>.json (or a "
        "converted checkpoint holding split/)",
    )
    g.add_argument(
        "--expert-sizes",
        type=_ints,
        help="unequal expert sizes, comma separated "
        "(every layer); must sum to intermediate_size except for gradient "
        "sharing-inner",
    )
    g.add_argument(
        "--gate-network-type",
        "--gate-network",
        dest="gate_network",
        choices=GATE_NETWORKS,
        help="gate network (default mlp)",
    )
    g.add_argument("--gate-type", choices=GATE_TYPES)
    g.add_argument("--split-metric", choices=["l2", "cosine"], default="l2", help="clustering")
    g.add_argument(
        "--split-key",
        choices=["up", "gate"],
        default="up",
        help="clustering: cluster the rows of up_proj (default) or gate_proj",
    )
    g.add_argument(
        "--split-data",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="graph/gradient: Megatron indexed datasets (PREFIX.bin/.idx) to sample",
    )
    g.add_argument("--split-samples", type=int, default=64, help="sample sequences (default 64)")
    g.add_argument("--split-seq-length", type=int, default=256, help="tokens per sample")
    g.add_argument("--split-batch-size", type=int, default=8)
    g.add_argument(
        "--graph-active-fraction",
        type=float,
        default=0.1,
        help="graph: a unit is active on a token when its |h| is in the token's top "
        "fraction (default 0.1)",
    )
    g.add_argument(
        "--graph-threshold",
        type=float,
        default=0.0,
        help="graph: drop edges co-active on fewer than this fraction of tokens",
    )
    g.add_argument(
        "--gradient-variant", choices=["non-sharing", "sharing-inner"], default="non-sharing"
    )
    L = a.add_argument_group("target layout (checked only: loading reshards to any layout)")
    L.add_argument("--tensor-model-parallel-size", type=int, default=1)
    L.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    L.add_argument("--expert-model-parallel-size", type=int, default=1)
    a.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="parameter dtype of the checkpoint (default float32, lossless)",
    )
    a.add_argument("--overwrite", action="store_true", help="replace an existing output")
    a.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("megamoe-to-hf", help="megamoe checkpoint -> HF LLaMA or LLaMA-MoE")
    b.add_argument("--checkpoint", required=True, help="megamoe checkpoint directory")
    b.add_argument("--output", required=True, help="HF directory to write")
    b.add_argument(
        "--format", choices=["llama", "llama_moe"], help="default: the checkpoint's model_type"
    )
    b.add_argument("--tokenizer", help="tokenizer file or directory to copy into the output")
    b.add_argument(
        "--max-shard-size",
        default="5GB",
        help="shard the safetensors above this size (default 5GB); the shard being "
        "filled is held in memory",
    )
    b.add_argument("--dtype", choices=list(DTYPES), default="float32")
    b.add_argument(
        "--remote-code",
        help="llama_moe: directory with LLaMA-MoE's modeling code "
        "(*.py) to copy; config.json then gets the matching auto_map",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing output")
    b.add_argument("--no-progress", action="store_true")
    return p


def run(argv: Sequence[str] | None = None, prog: str = "convert_hf_checkpoint.py") -> Path:
    """Parse and convert; raises on bad input."""
    args = build_parser(prog).parse_args(argv)
    if args.command == "hf-to-megamoe":
        opts = SplitOptions(
            method=args.split,
            seed=args.split_seed,
            expert_sizes=args.expert_sizes,
            split_file=args.split_file,
            metric=args.split_metric,
            key=args.split_key,
            data=args.split_data,
            samples=args.split_samples,
            seq_length=args.split_seq_length,
            batch_size=args.split_batch_size,
            graph_active_fraction=args.graph_active_fraction,
            graph_threshold=args.graph_threshold,
            gradient_variant=args.gradient_variant,
        )
        return hf_to_megamoe(
            args.hf_dir,
            args.output,
            args.model_type,
            args.num_experts,
            args.num_selects,
            args.gate_network,
            args.gate_type,
            args.score_scale_factor,
            opts,
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.expert_model_parallel_size,
            args.dtype,
            args.overwrite,
            not args.no_progress,
        )
    return megamoe_to_hf(
        args.checkpoint,
        args.output,
        args.format,
        args.tokenizer,
        args.max_shard_size,
        args.dtype,
        args.remote_code,
        args.overwrite,
        not args.no_progress,
    )


def main(argv: Sequence[str] | None = None, prog: str = "convert_hf_checkpoint.py") -> int:
    """The command line: 0 on success; 2 with one clear error line on bad input."""
    return run_command(prog, _convert, argv)


def _convert(argv: Sequence[str], prog: str) -> int:
    print(f"wrote {run(argv, prog)}", file=sys.stderr)
    return 0
