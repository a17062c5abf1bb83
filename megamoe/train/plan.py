"""Everything about a training run that can be checked before any work: flags, the pretrained
model, the data, the processes. `make_plan(run)` returns the findings (megamoe/findings.py) and a
:class:`Plan` holding what they resolved (model and MoE configs, domains and their weights, the
schedule, where to resume from), computed once for the trainer and `megamoe check` alike; the
trainer starts only when no finding is an error.

Only cheap reads happen here: JSON configs, directory listings and .idx headers; no model is
built, megatron-core is not imported, and no process group is started. The one write: with
`repair` (the trainer's rank 0), a damaged checkpoint of the run is renamed out of the way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import layout as ckpt
from ..config import DEFAULT_NUM_EXPERTS, ModelConfig, MoEConfig, RunConfig, spell_flag
from ..findings import Finding, error, errors, raise_errors, warning
from ..parallel.layout import ParallelLayout


@dataclass
class Pretrained:
    """What --pretrained_model (or the run's newest checkpoint) holds."""

    path: str
    kind: str  # "megamoe" | "hf"
    meta: dict  # megamoe.json, or the HF config.json
    model: ModelConfig
    moe: MoEConfig | None  # None: a dense LLaMA

    @property
    def model_type(self) -> str:
        return "llama_moe" if self.moe is not None else "llama"


@dataclass
class Plan:
    run: RunConfig
    world_size: int
    num_nodes: int
    gpus_per_node: int
    dp_size: int | None  # None: the layout does not fit the world
    layout: ParallelLayout  # sequence parallelism resolved
    model: ModelConfig | None  # None: the weights could not be read
    moe: MoEConfig | None  # the run's MoE: the weights' config with the flags applied
    source: Pretrained | None  # --pretrained_model
    convert_to: str | None  # where an HF model is converted to (None: a megamoe checkpoint)
    domains: dict  # {domain: [dataset prefixes]}
    prob_map: str  # the name given (or defaulted), for the log
    domain_weights: dict  # {domain: initial weight}, normalised
    ref_loss: dict | None  # {domain: reference loss} for dynamic data selection
    max_steps: int
    global_batch_size: int
    tokens_per_batch: int
    resume_from: str | None
    use_distributed_optimizer: bool
    findings: list = field(default_factory=list)

    @property
    def pretrained_checkpoint(self) -> str:
        """The megamoe checkpoint the weights come from (after any conversion)."""
        return self.convert_to or self.source.path

    @property
    def warnings(self) -> list[str]:
        return [f.text() for f in self.findings if not f.is_error]


def read_pretrained(
    path: str, flag: str = "pretrained_model"
) -> tuple[Pretrained | None, list[Finding]]:
    """A megamoe checkpoint (megamoe.json) or a Hugging Face directory (config.json), read
    cheaply: configs only."""
    from ..formats.hf_config import HFFormatError, model_config_from_hf, moe_config_from_hf

    p = Path(path)
    if not p.is_dir():
        return None, [error(flag, f"{{flag}} {path}: no such directory")]
    try:
        if (p / ckpt.META).is_file():
            meta = ckpt.read_meta(p)
            model, moe = ckpt.configs_from_meta(meta)
            if meta.get("model_type") not in ("llama", "llama_moe"):
                raise ValueError(
                    f"model_type {meta.get('model_type')!r} is neither llama nor llama_moe"
                )
            return Pretrained(str(path), "megamoe", meta, model, moe), []
        if (p / "config.json").is_file():
            cfg_path = str(p / "config.json")
            try:
                cfg = json.loads((p / "config.json").read_text())
            except ValueError as e:
                raise ValueError(f"config.json is not valid json ({e})") from None
            model = model_config_from_hf(cfg, cfg_path)
            moe = (
                moe_config_from_hf(cfg, model, cfg_path)
                if cfg.get("model_type") == "llama_moe"
                else None
            )
            return Pretrained(str(path), "hf", cfg, model, moe), []
    except (ValueError, TypeError, KeyError, ckpt.CheckpointError, HFFormatError) as e:
        return None, [error(flag, f"{{flag}} {path}: {e}")]
    return None, [
        error(
            flag,
            f"{{flag}} {path}: neither a megamoe checkpoint ({ckpt.META}) nor "
            "a Hugging Face model directory (config.json)",
        )
    ]


def resolve_moe(
    run: RunConfig, weights: Pretrained, label: str
) -> tuple[MoEConfig | None, list[Finding]]:
    """The run's MoEConfig: the weights' own with the flags applied, or (a dense model made a
    LLaMA-MoE on the fly) one built from the flags. `label` names the weights in messages."""
    mc, target = run.moe, run.train.model_type
    if target == "llama":
        out = []
        if weights.moe is not None:
            out.append(
                error(
                    "model_type",
                    f"--model_type llama, but {label} is a LLaMA-MoE model",
                    "use --model_type llama_moe",
                )
            )
        given = [k for k, v in mc.overrides().items() if v is not None]
        if given:
            out.append(
                warning(
                    given[0],
                    f"{', '.join(map(spell_flag, given))} apply to "
                    "llama_moe only; ignored for --model_type llama",
                )
            )
        return None, out
    if weights.moe is not None:
        moe, out = weights.moe.with_overrides(**mc.overrides())
    elif weights.kind == "megamoe":
        return None, [
            error(
                "model_type",
                f"--model_type llama_moe, but {label} is a dense megamoe checkpoint",
                "give the dense Hugging Face directory "
                "(converted on the fly) or convert it with "
                "tools/convert_hf_checkpoint.py hf-to-megamoe --model-type llama_moe",
            )
        ]
    else:  # experts cut from a dense HF model on the fly: the flags, else the defaults
        moe, out = MoEConfig(**{k: v for k, v in mc.overrides().items() if v is not None}), []
    return moe, out + moe.check(weights.model)


def _resume_findings(run: RunConfig, newest: Pretrained) -> list[Finding]:
    """A run resumed from its newest checkpoint must be the same run: same training mode, and
    started from the same pretrained model (else it would silently go on with the old one)."""
    t, out = run.train, []
    saved_lora = bool(newest.meta.get("lora"))
    if saved_lora != (t.training_mode == "lora"):
        out.append(
            error(
                "training_mode",
                f"{newest.path} was trained with {{flag}} "
                f"{'lora' if saved_lora else 'fpt'}, this run asks for {t.training_mode}",
                "use the same mode, or another --output_dir",
            )
        )
    saved = newest.meta.get("pretrained_model")  # absolute; written since this check exists
    if (
        saved
        and t.pretrained_model
        and os.path.realpath(saved) != os.path.realpath(t.pretrained_model)
    ):
        out.append(
            error(
                "pretrained_model",
                f"--output_dir {t.output_dir} holds a run started from "
                f"{saved}, not from {{flag}} {t.pretrained_model}",
                "resuming would go on "
                "training the old run's model: give the same --pretrained_model to "
                "resume it, or another --output_dir for a new run",
            )
        )
    return out


def _world(run: RunConfig, env: Mapping[str, str]) -> tuple[int, int, int, list[Finding]]:
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    pc = run.parallel
    nodes, gpn = pc.num_nodes, pc.num_gpu_per_node
    if (nodes is not None and nodes < 1) or (gpn is not None and gpn < 1):
        return world, 1, world, []  # ParallelConfig.check reports it
    if nodes is None and gpn is None:
        gpn = local if world % max(local, 1) == 0 else world
        nodes = world // gpn
    elif nodes is None:
        nodes = max(world // gpn, 1)
    elif gpn is None:
        gpn = max(world // nodes, 1)
    out = []
    if nodes * gpn != world:
        out.append(
            error(
                "world_size",
                f"the world size is {world} process(es), but --num_nodes {nodes} x "
                f"--num_gpu_per_node {gpn} = {nodes * gpn}",
                f"start num_nodes x num_gpu_per_node processes (torchrun --nnodes {nodes} "
                f"--nproc_per_node {gpn}), or correct the flags to match the job (Slurm "
                "--nodes and --gres=gpu:N)",
            )
        )
    return world, nodes, gpn, out


def layout_advice(tp: int, ep: int, dp: int, nodes: int, gpn: int, run: RunConfig) -> list[Finding]:
    """Layouts that run but are slow or do nothing. megatron-core numbers ranks TP first, then EP
    (experts' TP = TP), so a TP group spans tp consecutive ranks and an EP group tp x ep of them:
    beyond one node they talk over the inter-node network, every layer."""
    out = []
    if nodes > 1 and tp > gpn:
        out.append(
            warning(
                "tensor_model_parallel_size",
                f"{{flag}} {tp} > {gpn} GPUs per node: "
                "every layer's tensor-parallel collectives cross nodes",
                "keep TP within a node (PP or DP across nodes)",
            )
        )
    elif nodes > 1 and ep > 1 and tp * ep > gpn:
        out.append(
            warning(
                "expert_model_parallel_size",
                f"{{flag}} {ep} x "
                f"--tensor_model_parallel_size {tp} > {gpn} GPUs per node: every MoE "
                "layer's all-to-all crosses nodes",
                "keep TP x EP within a node",
            )
        )
    pc = run.parallel
    if pc.overlap_grad_reduce and dp == 1:
        out.append(
            warning(
                "overlap_grad_reduce", "{flag} has nothing to overlap with one data-parallel rank"
            )
        )
    if pc.ep_overlap_chunks > 1 and ep == 1:
        out.append(
            warning(
                "ep_overlap_chunks",
                f"{{flag}} {pc.ep_overlap_chunks} does nothing without expert parallelism",
            )
        )
    if pc.tp_comm_overlap and tp == 1:
        out.append(warning("tp_comm_overlap", "{flag} does nothing without tensor parallelism"))
    return out


def _datasets(flag: str, sets: dict, block_size: int, model: ModelConfig | None) -> list[Finding]:
    """Every dataset of every domain opens (its .idx and .bin agree), every domain holds at least
    one block, and no token id reaches the model's vocabulary (the largest id recorded by our
    preprocessing; data made by other tools is checked as it is read)."""
    from ..data.indexed import read_stats
    from ..data.packing import DomainStream

    out = []
    if block_size < 2:  # DataConfig.check says so
        return out
    for domain, prefixes in sets.items():
        try:
            stream = DomainStream(domain, prefixes, block_size)
        except (OSError, ValueError) as e:  # IndexedDatasetError names the file
            out.append(
                error(
                    flag,
                    f"{{flag}}: {e}",
                    "re-run tools/preprocess_data.py for it, or remove it from the folder",
                )
            )
            continue
        for prefix, file in zip(prefixes, stream.files) if model is not None else ():
            try:
                top = (read_stats(prefix, file.ds) or {}).get("max_token_id", -1)
            except ValueError as e:
                out.append(error(flag, f"{{flag}}: {e}"))
                continue
            if top >= model.vocab_size:
                out.append(
                    error(
                        flag,
                        f"{{flag}}: {prefix}.bin holds token id {top}, beyond the "
                        f"model's vocab_size {model.vocab_size}",
                        "it was tokenized with another tokenizer: preprocess it with "
                        "the pretrained model's own",
                    )
                )
    return out


def _data(
    run: RunConfig, out: list[Finding], model: ModelConfig | None
) -> tuple[dict, str, dict, dict | None]:
    """(domains, prob_map name, weights, reference losses) of --dataset_dir and friends."""
    from ..data.domains import DOMAINS, check_domain_names, load_prob_map, load_ref_loss
    from ..data.train_data import find_domain_folders
    from ..data.valid_data import find_validation_sets

    d = run.data
    domains: dict = {}
    prob_map, weights, ref = d.prob_map, {}, None
    if d.dataset_dir:
        try:
            domains = find_domain_folders(d.dataset_dir)
        except (OSError, ValueError) as e:
            out.append(error("dataset_dir", f"{{flag}}: {e}"))
        out += _datasets("dataset_dir", domains, d.block_size, model)
    if domains:
        if prob_map is None:
            prob_map = "sheared_llama" if sorted(domains) == sorted(DOMAINS) else "uniform"
        try:
            weights = load_prob_map(prob_map, list(domains))
        except ValueError as e:
            out.append(error("prob_map", f"{{flag}}: {e}"))
        if d.dynamic_data_selection != "none":
            try:
                ref = load_ref_loss(d.ref_loss, list(domains))
            except ValueError as e:
                out.append(error("ref_loss", f"{{flag}}: {e}"))
    if d.validation_dir:
        try:
            found = find_validation_sets(d.validation_dir)
            if domains:
                check_domain_names(
                    list(found), list(domains), f"--validation_dir {d.validation_dir} (its sets)"
                )
            out += _datasets("validation_dir", found, d.block_size, model)
        except (OSError, ValueError) as e:
            out.append(error("validation_dir", f"{{flag}}: {e}"))
    return domains, prob_map, weights, ref


def _tokenizer(path: str, model: ModelConfig | None) -> list[Finding]:
    if not os.path.isfile(path):
        return [error("tokenizer_model", f"{{flag}} {path}: no such file")]
    if model is None:
        return []
    try:
        import sentencepiece as spm

        n = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    except (RuntimeError, OSError) as e:
        return [error("tokenizer_model", f"{{flag}} {path}: not a sentencepiece model ({e})")]
    v = model.vocab_size
    if n > v:
        return [
            error(
                "tokenizer_model",
                f"{{flag}} has {n} tokens, more than the model's vocab_size {v}",
                "give the pretrained model's own tokenizer",
            )
        ]
    padded = v % 64 == 0 and v - n < min(256, v / 100)  # Megatron pads to a multiple of 64+
    if n < v and not padded:
        return [
            error(
                "tokenizer_model",
                f"{{flag}} has {n} tokens but the model's vocab_size is "
                f"{v}: the tokenizer of another model?",
                "give the pretrained model's own tokenizer (the vocabulary may only pad "
                "it to a multiple of 64 or more, as Megatron does)",
            )
        ]
    return []


def unused_parts(run: RunConfig) -> tuple[str, ...]:
    """What of a checkpoint a resume will not read (need not be intact)."""
    return () if run.train.load_optimizer else ("optimizer/",)


def intact_checkpoint(run: RunConfig, out: list[Finding], repair: bool) -> str | None:
    """The newest checkpoint of the run whose metadata reads and whose files have their
    manifest's sizes (the cheap half of checkpoint.layout.verify; the trainer compares the
    checksums too). A damaged one is reported and, with `repair`, renamed out of the way."""
    for _, path in reversed(ckpt.list_checkpoints(run.train.output_dir)):
        bad = ckpt.verify(path, share=None, skip=unused_parts(run))
        if not bad:
            return path
        out.append(set_aside(path, bad, repair))
    return None


def set_aside(path: str, bad: list[str], rename: bool) -> Finding:
    """The warning about a damaged checkpoint; with `rename`, it is moved out of the way first
    (kept, never deleted: checkpoint.layout.quarantine)."""
    fate = "the run renames it and resumes from an older one"
    if rename:
        try:
            fate = f"renamed to {ckpt.quarantine(path)}; resuming from an older one"
        except OSError as e:
            fate = f"could not rename it ({e}); resuming from an older one"
    more = f" (and {len(bad) - 1} more problem(s))" if len(bad) > 1 else ""
    return warning("output_dir", f"{path} is damaged: {bad[0]}{more}", fate)


def make_plan(
    run: RunConfig,
    env: Mapping[str, str] | None = None,
    cuda: bool | None = None,
    repair: bool = False,
) -> tuple[Plan, list[Finding]]:
    """Check `run`; returns (the plan, every finding). `repair`: rename damaged checkpoints of
    the run out of the way (the trainer; `megamoe check` only reports them)."""
    env = os.environ if env is None else env
    if cuda is None:
        cuda = _cuda_available()
    t, d, o, pc = run.train, run.data, run.optim, run.parallel
    out = run.check()
    world, nodes, gpn, found = _world(run, env)
    out += found

    # the weights: the run's newest checkpoint when resuming, else the pretrained model
    source = moe = None
    if t.pretrained_model:
        source, found = read_pretrained(t.pretrained_model)
        out += found
    resume_from = None
    if t.output_dir:
        if os.path.exists(t.output_dir) and not os.path.isdir(t.output_dir):
            out.append(
                error("output_dir", f"{{flag}} {t.output_dir} exists and is not a directory")
            )
        resume_from = intact_checkpoint(run, out, repair and env.get("RANK", "0") == "0")
        if resume_from and not t.resume:
            out.append(
                error(
                    "resume",
                    f"--output_dir {t.output_dir} already holds checkpoints "
                    f"(newest {resume_from}) and {{flag}} is false",
                    "resume, or choose another --output_dir",
                )
            )
    weights = source
    if resume_from and t.resume:
        weights, found = read_pretrained(resume_from, "output_dir")
        out += found
        if weights is not None:
            out += _resume_findings(run, weights)
    if weights is not None:
        label = f"--pretrained_model {t.pretrained_model}" if weights is source else resume_from
        moe, found = resolve_moe(run, weights, label)
        out += found
    model = weights.model if weights is not None else None
    convert_to = None
    if source is not None and source.kind == "hf" and t.output_dir:
        tag = (
            "llama"
            if t.model_type == "llama"
            else (
                f"llama_moe-E{moe.num_experts}"
                + ("" if source.moe is not None else f"-random{run.moe.split_seed}")
            )
            if moe
            else "x"
        )
        convert_to = os.path.join(t.output_dir, f"pretrained-{tag}")

    # layout
    tp, ep = pc.tensor_model_parallel_size, pc.expert_model_parallel_size
    sp = pc.sequence_parallel if pc.sequence_parallel is not None else tp > 1
    layout = ParallelLayout(tp, pc.pipeline_model_parallel_size, ep, sequence_parallel=sp)
    is_moe = moe is not None or (weights is None and t.model_type == "llama_moe")
    num_experts = (
        moe.num_experts
        if moe is not None
        else ((run.moe.num_experts or DEFAULT_NUM_EXPERTS) if is_moe else None)
    )
    layout_findings = layout.check(model, num_experts, world)
    out += layout_findings
    dp = None
    if not errors(layout_findings):
        dp = layout.data_parallel_size(world)
        out += layout_advice(tp, ep, dp, nodes, gpn, run)
    if model is not None:
        if d.block_size > model.max_position_embeddings:
            out.append(
                warning(
                    "block_size",
                    f"{{flag}} {d.block_size} is longer than the "
                    f"model's max_position_embeddings {model.max_position_embeddings}",
                )
            )
        if sp and d.block_size % tp:
            out.append(
                error(
                    "block_size",
                    f"{{flag}} {d.block_size} must be divisible by "
                    f"--tensor_model_parallel_size {tp} (sequence "
                    "parallelism)",
                )
            )

    domains, prob_map, domain_weights, ref_loss = _data(run, out, model)
    if t.tokenizer_model:
        out += _tokenizer(t.tokenizer_model, model)

    # schedule
    global_batch = d.per_device_train_batch_size * d.gradient_accumulation_steps * (dp or 1)
    tokens_per_batch = global_batch * d.block_size
    max_steps = t.max_steps or 0
    if t.max_tokens is not None and t.max_steps is None and tokens_per_batch > 0:
        max_steps = max(1, t.max_tokens // tokens_per_batch)
    if o.warmup_steps >= max_steps > 0:
        out.append(
            warning(
                "warmup_steps",
                f"{{flag}} {o.warmup_steps} >= max_steps {max_steps}: "
                "the learning rate never leaves the warmup",
            )
        )
    if t.bf16 and not cuda:
        out.append(
            warning(
                "bf16",
                "--bf16 on CPU: fp32 parameters and optimizer, bf16 autocast "
                "for the forward and backward",
            )
        )
    if t.attention_backend not in ("auto", "math") and not cuda:
        out.append(
            error(
                "attention_backend",
                f"{{flag}} {t.attention_backend} is a GPU kernel",
                "use auto or math on CPU",
            )
        )
    use_dist = o.use_distributed_optimizer if o.use_distributed_optimizer is not None else cuda
    if use_dist and not cuda:
        out.append(
            error(
                "use_distributed_optimizer",
                "{flag} needs CUDA (megatron-core's distributed optimizer)",
                "leave it out on CPU",
            )
        )
    if pc.overlap_param_gather and not use_dist:
        out.append(
            warning(
                "overlap_param_gather",
                "{flag} applies to the distributed optimizer only (CUDA): ignored",
            )
        )
    plan = Plan(
        run=run,
        world_size=world,
        num_nodes=nodes,
        gpus_per_node=gpn,
        dp_size=dp,
        layout=layout,
        model=model,
        moe=moe,
        source=source,
        convert_to=convert_to,
        domains=domains,
        prob_map=prob_map,
        domain_weights=domain_weights,
        ref_loss=ref_loss,
        max_steps=max_steps,
        global_batch_size=global_batch,
        tokens_per_batch=tokens_per_batch,
        resume_from=resume_from if t.resume else None,
        use_distributed_optimizer=use_dist,
        findings=out,
    )
    return plan, out


def plan(run: RunConfig, env: Mapping[str, str] | None = None, cuda: bool | None = None) -> Plan:
    """make_plan (reporting, not repairing), raising ConfigError with every error at once."""
    p, found = make_plan(run, env, cuda)
    raise_errors(found)
    return p


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
