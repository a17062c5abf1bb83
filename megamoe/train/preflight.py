"""Everything about a run that can be checked before any work: flags, the pretrained model, the
data, the processes. `plan(run)` returns a :class:`Plan` or raises ConfigError listing every
problem at once (one line each, naming the flag or path and what to do); warnings (such as a
scale factor that is not #experts / #selected) are returned in the plan.

Only cheap reads happen here: JSON configs, directory listings and .idx headers; no model is
built, megatron-core is not imported, and no process group is started.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import ConfigError, ModelConfig, MoEConfig, RunConfig, from_dict

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
DEFAULT_NUM_EXPERTS = 16
DEFAULT_NUM_SELECTS = 4
META = "megamoe.json"  # megamoe.checkpoint.META (not imported: it pulls in megatron-core)


@dataclass
class Plan:
    run: RunConfig
    world_size: int
    num_nodes: int
    gpus_per_node: int
    dp_size: int
    model: ModelConfig
    moe: Optional[MoEConfig]
    source_kind: str  # "megamoe" | "hf"
    source_meta: dict
    convert_to: Optional[str]  # where an HF model is converted to (None: a megamoe checkpoint)
    domains: list
    prob_map: str
    max_steps: int
    global_batch_size: int
    tokens_per_batch: int
    resume_from: Optional[str]
    sequence_parallel: bool
    use_distributed_optimizer: bool
    warnings: list = field(default_factory=list)

    @property
    def pretrained_checkpoint(self) -> str:
        """The megamoe checkpoint the weights come from (after any conversion)."""
        return self.convert_to or self.run.train.pretrained_model


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (their metadata file written last) as sorted (step, path)."""
    out = []
    if output_dir and os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = CKPT_RE.match(name)
            path = os.path.join(output_dir, name)
            if m and os.path.isfile(os.path.join(path, META)):
                out.append((int(m.group(1)), path))
    return sorted(out)


def _read_source(path: str, errors: list) -> tuple[str, dict]:
    """('megamoe' | 'hf', metadata or HF config.json) of --pretrained_model."""
    p = Path(path)
    if (p / META).is_file():
        try:
            return "megamoe", json.loads((p / META).read_text())
        except json.JSONDecodeError as e:
            errors.append(f"--pretrained_model {path}: {META} is not valid json ({e})")
            return "megamoe", {}
    if (p / "config.json").is_file():
        try:
            return "hf", json.loads((p / "config.json").read_text())
        except json.JSONDecodeError as e:
            errors.append(f"--pretrained_model {path}: config.json is not valid json ({e})")
            return "hf", {}
    errors.append(f"--pretrained_model {path}: neither a megamoe checkpoint ({META}) nor a "
                  "Hugging Face model directory (config.json)")
    return "", {}


def _world(run: RunConfig, env, errors: list) -> tuple[int, int, int]:
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    pc = run.parallel
    nodes, gpn = pc.num_nodes, pc.num_gpu_per_node
    for flag, v in (("--num_nodes", nodes), ("--num_gpu_per_node", gpn)):
        if v is not None and v < 1:
            errors.append(f"{flag} {v} must be at least 1")
            return world, 1, world
    if nodes is None and gpn is None:
        gpn = local if world % max(local, 1) == 0 else world
        nodes = world // gpn
    elif nodes is None:
        nodes = max(world // gpn, 1)
    elif gpn is None:
        gpn = max(world // nodes, 1)
    if nodes * gpn != world:
        errors.append(
            f"the world size is {world} process(es), but --num_nodes {nodes} x "
            f"--num_gpu_per_node {gpn} = {nodes * gpn}: start num_nodes x num_gpu_per_node "
            f"processes (torchrun --nnodes {nodes} --nproc_per_node {gpn}), or correct the flags "
            "to match the job (Slurm --nodes and --gres=gpu:N)")
    return world, nodes, gpn


def _moe_config(run: RunConfig, kind: str, meta: dict, errors: list, warnings: list,
                model: Optional[ModelConfig]) -> Optional[MoEConfig]:
    mc = run.moe
    target = run.train.model_type
    if kind == "megamoe":
        src_type = meta.get("model_type")
        src_moe = from_dict(MoEConfig, meta["moe"]) if meta.get("moe") else None
    else:
        src_type = meta.get("model_type")
        src_moe = None
        if src_type == "llama_moe" and model is not None:
            from ..formats.hf_config import moe_config_from_hf

            try:
                src_moe = moe_config_from_hf(meta, model, "config.json")
            except ValueError as e:
                errors.append(f"--pretrained_model: {e}")
                return None
    if src_type not in ("llama", "llama_moe"):
        errors.append(f"--pretrained_model {run.train.pretrained_model}: model_type {src_type!r} "
                      "is neither llama nor llama_moe")
        return None
    if target == "llama":
        if src_type == "llama_moe":
            errors.append(f"--model_type llama, but --pretrained_model "
                          f"{run.train.pretrained_model} is a LLaMA-MoE model: use --model_type "
                          "llama_moe")
        given = [f"--{f.name}" for f in dataclasses.fields(mc)
                 if f.name != "split_seed" and getattr(mc, f.name) is not None]
        if given:
            warnings.append(f"{', '.join(given)} apply to llama_moe only; ignored for --model_type llama")
        return None
    # llama_moe
    if src_moe is None:  # experts constructed from a dense model
        if kind == "megamoe":
            errors.append(f"--model_type llama_moe, but --pretrained_model "
                          f"{run.train.pretrained_model} is a dense megamoe checkpoint: give the "
                          "dense Hugging Face directory (converted on the fly) or convert it with "
                          "tools/convert_hf_checkpoint.py hf-to-megamoe --model-type llama_moe")
            return None
        e = mc.num_experts or DEFAULT_NUM_EXPERTS
        moe = MoEConfig(num_experts=e, num_selects=mc.num_selects or DEFAULT_NUM_SELECTS,
                        gate_network=mc.gate_network_type or "mlp")
        if mc.gate_type:
            moe.gate_type = mc.gate_type
    else:
        moe = dataclasses.replace(src_moe)
        if mc.num_experts is not None and mc.num_experts != moe.num_experts:
            errors.append(f"--num_experts {mc.num_experts}: --pretrained_model has "
                          f"{moe.num_experts} experts per layer (the number of experts cannot change)")
        if mc.gate_network_type and mc.gate_network_type != moe.gate_network:
            errors.append(f"--gate_network_type {mc.gate_network_type}: the pretrained gates are "
                          f"{moe.gate_network!r} networks")
        if mc.gate_type and mc.gate_type != moe.gate_type:
            errors.append(f"--gate_type {mc.gate_type}: the pretrained gates are {moe.gate_type}")
        if mc.num_selects is not None:
            moe.num_selects = mc.num_selects
    if mc.moe_calculator_score_scale_factor is not None:
        moe.score_scale_factor = mc.moe_calculator_score_scale_factor
    for name, attr in (("gate_balance_loss_weight", "gate_balance_loss_weight"),
                       ("gate_add_noise", "gate_add_noise"), ("gate_load_rule", "gate_load_rule"),
                       ("multiply_gate_scores", "multiply_gate_scores")):
        v = getattr(mc, name)
        if v is not None:
            setattr(moe, attr, v)
    e, k = moe.num_experts, moe.num_selects
    if k < 1 or k > e:
        errors.append(f"--num_selects {k} must be between 1 and the number of experts {e}")
        return moe
    if model is not None:
        try:
            moe.validate(model)
        except ValueError as err:
            errors.append(str(err))
            return moe
        want = e / k
        sfs = [moe.scale_factor(i) for i in range(model.num_hidden_layers)]
        off = sorted({sf for sf in sfs if not math.isclose(sf, want, rel_tol=1e-6)})
        if off:
            warnings.append(f"--moe_calculator_score_scale_factor {off[0] if len(off) == 1 else off} "
                            f"is not #experts / #selected = {e}/{k} = {want:g}: the experts' output "
                            "is scaled differently from the dense FFN the model was cut from")
    if moe.gate_balance_loss_weight < 0:
        errors.append(f"--gate_balance_loss_weight {moe.gate_balance_loss_weight} must be >= 0")
    return moe


def plan(run: RunConfig, env=None, cuda: Optional[bool] = None) -> Plan:
    """Check `run` and resolve what it implies; raise ConfigError with every problem found."""
    env = os.environ if env is None else env
    if cuda is None:
        cuda = _cuda_available()
    errors: list = []
    warnings: list = []
    t, d, o, pc = run.train, run.data, run.optim, run.parallel

    for flag, v in (("--pretrained_model", t.pretrained_model), ("--dataset_dir", d.dataset_dir),
                    ("--output_dir", t.output_dir)):
        if not v:
            errors.append(f"{flag} is required")
    positive = [("--block_size", d.block_size, 2), ("--per_device_train_batch_size", d.per_device_train_batch_size, 1),
                ("--gradient_accumulation_steps", d.gradient_accumulation_steps, 1),
                ("--logging_steps", t.logging_steps, 1), ("--tensor_model_parallel_size", pc.tensor_model_parallel_size, 1),
                ("--pipeline_model_parallel_size", pc.pipeline_model_parallel_size, 1),
                ("--expert_model_parallel_size", pc.expert_model_parallel_size, 1)]
    for flag, v, lo in positive:
        if v < lo:
            errors.append(f"{flag} {v} must be at least {lo}")
    for flag, v in (("--eval_steps", t.eval_steps), ("--save_steps", t.save_steps),
                    ("--warmup_steps", o.warmup_steps)):
        if v < 0:
            errors.append(f"{flag} {v} must be >= 0")
    if d.per_device_eval_batch_size is not None and d.per_device_eval_batch_size < 1:
        errors.append(f"--per_device_eval_batch_size {d.per_device_eval_batch_size} must be at least 1")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        errors.append(f"--save_total_limit {t.save_total_limit} must be at least 1 (or leave it out)")
    if o.learning_rate <= 0 or not math.isfinite(o.learning_rate):
        errors.append(f"--learning_rate {o.learning_rate} must be a positive number")
    if not 0.0 <= o.final_lr_portion <= 1.0:
        errors.append(f"--final_lr_portion {o.final_lr_portion} must be between 0 and 1")
    if (t.max_steps is None) == (t.max_tokens is None):
        errors.append("give exactly one of --max_steps and --max_tokens")
    elif t.max_steps is not None and t.max_steps < 1:
        errors.append(f"--max_steps {t.max_steps} must be at least 1")
    elif t.max_tokens is not None and t.max_tokens < 1:
        errors.append(f"--max_tokens {t.max_tokens} must be at least 1")
    world, nodes, gpn = _world(run, env, errors)

    # the pretrained model
    model = moe = None
    kind, meta, convert_to = "", {}, None
    if t.pretrained_model:
        if not os.path.isdir(t.pretrained_model):
            errors.append(f"--pretrained_model {t.pretrained_model}: no such directory")
        else:
            kind, meta = _read_source(t.pretrained_model, errors)
    if kind == "megamoe" and meta.get("model"):
        try:
            model = from_dict(ModelConfig, meta["model"])
        except (ValueError, TypeError) as e:
            errors.append(f"--pretrained_model {t.pretrained_model}: bad model config ({e})")
    elif kind == "hf" and meta:
        from ..formats.hf_config import model_config_from_hf

        try:
            model = model_config_from_hf(meta, os.path.join(t.pretrained_model, "config.json"))
        except ValueError as e:
            errors.append(f"--pretrained_model: {e}")
    if kind and meta:
        moe = _moe_config(run, kind, meta, errors, warnings, model)
    if kind == "hf" and t.output_dir and model is not None:
        tag = "llama" if t.model_type == "llama" else (
            f"llama_moe-E{moe.num_experts}" + ("" if meta.get("model_type") == "llama_moe"
                                                else f"-random{run.moe.split_seed}")) if moe else "x"
        convert_to = os.path.join(t.output_dir, f"pretrained-{tag}")

    # layout
    tp, pp, ep = pc.tensor_model_parallel_size, pc.pipeline_model_parallel_size, pc.expert_model_parallel_size
    sp = pc.sequence_parallel if pc.sequence_parallel is not None else tp > 1
    if tp > 1 and moe is not None and not sp:
        errors.append("--sequence_parallel false: LLaMA-MoE with tensor parallelism needs sequence "
                      "parallelism (each TP rank routes its own tokens); leave the flag out")
    dp = 1
    if min(tp, pp, ep) >= 1:
        if world % (tp * pp):
            errors.append(f"the world size {world} is not divisible by --tensor_model_parallel_size "
                          f"{tp} x --pipeline_model_parallel_size {pp}")
        else:
            dp = world // (tp * pp)
            if ep > 1 and moe is None:
                errors.append("--expert_model_parallel_size applies to llama_moe models only")
            elif (tp * dp) % ep:
                errors.append(f"--expert_model_parallel_size {ep} must divide tensor x data "
                              f"parallel size {tp * dp}")
            if moe is not None and moe.num_experts % ep:
                errors.append(f"--expert_model_parallel_size {ep} must divide the number of "
                              f"experts {moe.num_experts}")
            warnings.extend(_layout_warnings(tp, ep, dp, nodes, gpn, pc))
        if model is not None:
            checks = [("num_attention_heads", model.num_attention_heads, tp, "--tensor_model_parallel_size"),
                      ("num_key_value_heads", model.kv_heads, tp, "--tensor_model_parallel_size"),
                      ("vocab_size", model.vocab_size, tp, "--tensor_model_parallel_size"),
                      ("num_hidden_layers", model.num_hidden_layers, pp, "--pipeline_model_parallel_size")]
            if moe is None:
                checks.append(("intermediate_size", model.intermediate_size, tp, "--tensor_model_parallel_size"))
            for what, n, size, flag in checks:
                if n % size:
                    errors.append(f"{flag} {size} does not divide the model's {what} {n}")
            if d.block_size > model.max_position_embeddings:
                warnings.append(f"--block_size {d.block_size} is longer than the model's "
                                f"max_position_embeddings {model.max_position_embeddings}")
            if sp and d.block_size % tp:
                errors.append(f"--block_size {d.block_size} must be divisible by "
                              f"--tensor_model_parallel_size {tp} (sequence parallelism)")

    # data
    domains: list = []
    prob_map = d.prob_map
    if d.dataset_dir:
        from ..data.train_data import find_domain_folders

        try:
            domains = list(find_domain_folders(d.dataset_dir))
        except (OSError, ValueError) as e:
            errors.append(f"--dataset_dir: {e}")
    if domains:
        from ..data.domains import DOMAINS, load_prob_map, load_ref_loss

        if prob_map is None:
            prob_map = "sheared_llama" if sorted(domains) == sorted(DOMAINS) else "uniform"
        try:
            load_prob_map(prob_map, domains)
        except ValueError as e:
            errors.append(f"--prob_map: {e}")
        if d.dynamic_data_selection != "none":
            try:
                load_ref_loss(d.ref_loss, domains)
            except ValueError as e:
                errors.append(f"--ref_loss: {e}")
    if d.validation_dir:
        from ..data.domains import check_domain_names
        from ..data.valid_data import find_validation_sets

        try:
            found = find_validation_sets(d.validation_dir)
            if domains:
                check_domain_names(list(found), domains,
                                   f"--validation_dir {d.validation_dir} (its sets)")
        except (OSError, ValueError) as e:
            errors.append(f"--validation_dir: {e}")
    if d.dynamic_data_selection != "none":
        if not d.validation_dir:
            errors.append(f"--dynamic_data_selection {d.dynamic_data_selection} needs "
                          "--validation_dir (the weights follow the validation losses)")
        if t.eval_steps <= 0:
            errors.append(f"--dynamic_data_selection {d.dynamic_data_selection} needs "
                          "--eval_steps > 0 (the weights are updated at each evaluation)")
    if d.max_eval_blocks is not None and d.max_eval_blocks < 1:
        errors.append(f"--max_eval_blocks {d.max_eval_blocks} must be at least 1")

    # tokenizer
    if t.tokenizer_model:
        if not os.path.isfile(t.tokenizer_model):
            errors.append(f"--tokenizer_model {t.tokenizer_model}: no such file")
        elif model is not None:
            try:
                import sentencepiece as spm

                n = spm.SentencePieceProcessor(model_file=t.tokenizer_model).get_piece_size()
                if n > model.vocab_size:
                    errors.append(f"--tokenizer_model has {n} tokens, more than the model's "
                                  f"vocab_size {model.vocab_size}")
            except (RuntimeError, OSError) as e:
                errors.append(f"--tokenizer_model {t.tokenizer_model}: not a sentencepiece model ({e})")

    # LoRA
    if t.training_mode == "lora":
        if t.lora_rank < 1:
            errors.append(f"--lora_rank {t.lora_rank} must be at least 1")
        if not 0.0 <= t.lora_dropout < 1.0:
            errors.append(f"--lora_dropout {t.lora_dropout} must be in [0, 1)")
        from ..config import LORA_TARGETS

        bad = [x for x in t.lora_targets if x not in LORA_TARGETS]
        if bad or not t.lora_targets:
            errors.append(f"--lora_targets {','.join(t.lora_targets)}: choose from {','.join(LORA_TARGETS)}")

    # schedule
    global_batch = d.per_device_train_batch_size * d.gradient_accumulation_steps * dp
    tokens_per_batch = global_batch * d.block_size
    max_steps = t.max_steps or 0
    if t.max_tokens is not None and t.max_steps is None and tokens_per_batch > 0:
        max_steps = max(1, t.max_tokens // tokens_per_batch)
    if o.warmup_steps >= max_steps > 0:
        warnings.append(f"--warmup_steps {o.warmup_steps} >= max_steps {max_steps}: the learning "
                        "rate never leaves the warmup")

    # outputs and resume
    resume_from = None
    if t.output_dir:
        if os.path.exists(t.output_dir) and not os.path.isdir(t.output_dir):
            errors.append(f"--output_dir {t.output_dir} exists and is not a directory")
        ckpts = list_checkpoints(t.output_dir)
        if ckpts:
            if t.resume:
                resume_from = ckpts[-1][1]
            else:
                errors.append(f"--output_dir {t.output_dir} already holds checkpoints (newest "
                              f"{ckpts[-1][1]}) and --resume is false: resume, or choose another "
                              "--output_dir")
    if t.bf16 and not cuda:
        warnings.append("--bf16 on CPU: fp32 parameters and optimizer, bf16 autocast for the "
                        "forward and backward")

    if errors:
        raise ConfigError("\n".join(errors))
    use_dist = o.use_distributed_optimizer if o.use_distributed_optimizer is not None else cuda
    if use_dist and not cuda:
        raise ConfigError("--use_distributed_optimizer needs CUDA (megatron-core's distributed "
                          "optimizer); leave it out on CPU")
    return Plan(run=run, world_size=world, num_nodes=nodes, gpus_per_node=gpn, dp_size=dp,
                model=model, moe=moe, source_kind=kind, source_meta=meta, convert_to=convert_to,
                domains=domains, prob_map=prob_map, max_steps=max_steps,
                global_batch_size=global_batch, tokens_per_batch=tokens_per_batch,
                resume_from=resume_from, sequence_parallel=sp, use_distributed_optimizer=use_dist,
                warnings=warnings)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _layout_warnings(tp: int, ep: int, dp: int, nodes: int, gpn: int, pc) -> list:
    """Layouts that run but are slow or do nothing. megatron-core numbers ranks TP first, then EP
    (experts' TP = TP), so a TP group spans tp consecutive ranks and an EP group tp x ep of them:
    beyond one node they talk over the inter-node network, every layer."""
    out = []
    if nodes > 1 and tp > gpn:
        out.append(f"--tensor_model_parallel_size {tp} > {gpn} GPUs per node: every layer's tensor-"
                   "parallel collectives cross nodes; keep TP within a node (PP or DP across nodes)")
    elif nodes > 1 and ep > 1 and tp * ep > gpn:
        out.append(f"--expert_model_parallel_size {ep} x --tensor_model_parallel_size {tp} > {gpn} GPUs "
                   "per node: every MoE layer's all-to-all crosses nodes; keep TP x EP within a node")
    if pc.overlap_grad_reduce and dp == 1:
        out.append("--overlap_grad_reduce has nothing to overlap with one data-parallel rank")
    if pc.ddp_bucket_size is not None and not pc.overlap_grad_reduce:
        out.append(f"--ddp_bucket_size {pc.ddp_bucket_size} applies with --overlap_grad_reduce only: ignored")
    return out

