"""`megamoe check SCRIPT_OR_CONFIG`: the training guide's checklist as a pre-flight report.

    - [ ] balance loss weight        - [ ] global batch size
    - [ ] scale factor               - [ ] number of selected experts
    - [ ] learning rate              - [ ] pretrained model
    - [ ] warmup steps               - [ ] data path
    - [ ] evaluation steps           - [ ] GPUs
    - [ ] logging steps              - [ ] comment

An sbatch script is read without running it (ops/script.py): its #SBATCH header and the flags
it passes to scripts/launch.sh, as bash would expand them. A YAML/JSON config gives the trainer's
keys directly. The flags go through the trainer's own parser and plan (train/plan.py), so every
error the trainer would refuse to start with is here, filed under the checklist item of its flag
(ITEM_OF_FLAG); on top come the guide's judgements of values against the published recipes.

Each item is OK, WARN or ERROR; `megamoe check` exits 1 when any is an ERROR. scripts/launch.sh
runs the same checks before starting a job and refuses on errors.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..command import FlagParser, run_command
from ..config import MoEConfig, fmt_value
from ..findings import Finding
from ..train.plan import Plan, make_plan
from .script import OptionsError, Target, parse_run, read_target
from .slurm import job_shape, sbatch_nodes_gpus, slurm_gpus_per_node

OK, WARN, ERROR = "OK", "WARN", "ERROR"
_RANK = {OK: 0, WARN: 1, ERROR: 2}
CHECKLIST = [
    "balance loss weight",
    "scale factor",
    "learning rate",
    "warmup steps",
    "evaluation steps",
    "logging steps",
    "global batch size",
    "number of selected experts",
    "pretrained model",
    "data path",
    "GPUs",
    "comment",
]
SLURM_ITEM = "slurm"

# the checklist item each knob (or input) belongs to; findings of others go under "flags"
ITEM_OF_FLAG = {
    "gate_balance_loss_weight": "balance loss weight",
    "score_scale_factor": "scale factor",
    "learning_rate": "learning rate",
    "final_lr_portion": "learning rate",
    "weight_decay": "learning rate",
    "adam_beta1": "learning rate",
    "adam_beta2": "learning rate",
    "adam_epsilon": "learning rate",
    "max_grad_norm": "learning rate",
    "warmup_steps": "warmup steps",
    "eval_steps": "evaluation steps",
    "save_steps": "evaluation steps",
    "save_total_limit": "evaluation steps",
    "per_device_eval_batch_size": "evaluation steps",
    "max_eval_blocks": "evaluation steps",
    "exit_interval": "evaluation steps",
    "logging_steps": "logging steps",
    "block_size": "global batch size",
    "per_device_train_batch_size": "global batch size",
    "gradient_accumulation_steps": "global batch size",
    "max_steps": "global batch size",
    "max_tokens": "global batch size",
    "num_selects": "number of selected experts",
    "num_experts": "number of selected experts",
    "gate_type": "number of selected experts",
    "gate_network": "number of selected experts",
    "gate_load_rule": "number of selected experts",
    "capacity_factor": "number of selected experts",
    "pretrained_model": "pretrained model",
    "model_type": "pretrained model",
    "tokenizer_model": "pretrained model",
    "training_mode": "pretrained model",
    "lora_rank": "pretrained model",
    "lora_dropout": "pretrained model",
    "lora_targets": "pretrained model",
    "output_dir": "pretrained model",
    "resume": "pretrained model",
    "seed": "pretrained model",
    "dataset_dir": "data path",
    "validation_dir": "data path",
    "prob_map": "data path",
    "ref_loss": "data path",
    "dynamic_data_selection": "data path",
    "dds_eta": "data path",
    "dds_c": "data path",
    "world_size": "GPUs",
    "num_nodes": "GPUs",
    "num_gpu_per_node": "GPUs",
    "tensor_model_parallel_size": "GPUs",
    "pipeline_model_parallel_size": "GPUs",
    "expert_model_parallel_size": "GPUs",
    "sequence_parallel": "GPUs",
    "use_distributed_optimizer": "GPUs",
    "overlap_grad_reduce": "GPUs",
    "ddp_bucket_size": "GPUs",
    "bf16": "GPUs",
    "overlap_param_gather": "GPUs",
    "ep_overlap_chunks": "GPUs",
    "tp_comm_overlap": "GPUs",
    "comment": "comment",
}


@dataclass
class Line:
    status: str
    message: str


@dataclass
class Report:
    source: str = ""
    items: dict[str, list[Line]] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)

    def add(self, item: str, status: str, message: str) -> None:
        self.items.setdefault(item, []).append(Line(status, message))

    def ok(self, item: str, message: str) -> None:
        self.add(item, OK, message)

    def warn(self, item: str, message: str) -> None:
        self.add(item, WARN, message)

    def error(self, item: str, message: str) -> None:
        self.add(item, ERROR, message)

    def file(self, finding: Finding) -> None:
        """A finding of the trainer's rules, under its flag's item."""
        self.add(
            ITEM_OF_FLAG.get(finding.flag, "flags"),
            ERROR if finding.is_error else WARN,
            finding.text(),
        )

    def status(self, item: str) -> str:
        f = self.items.get(item, [])
        return max((x.status for x in f), key=_RANK.get, default=OK)

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [(k, f.message) for k, v in self.items.items() for f in v if f.status == ERROR]

    @property
    def warnings(self) -> list[tuple[str, str]]:
        return [(k, f.message) for k, v in self.items.items() for f in v if f.status == WARN]

    def _order(self) -> list[str]:
        return [k for k in CHECKLIST if k in self.items] + [
            k for k in self.items if k not in CHECKLIST
        ]

    def lines(self, only_problems: bool = False) -> list[str]:
        out = []
        for item in self._order():
            for f in self.items[item]:
                if only_problems and f.status == OK:
                    continue
                out.append(f"{f.status:5s} {item}: {f.message}")
        return out

    def render(self) -> str:
        width = max(len(k) for k in CHECKLIST + list(self.items))
        out = [f"pre-flight check: {self.source}"] if self.source else []
        out += [f"  {s}" for s in self.summary]
        for item in self._order():
            lines = self.items[item]
            st = self.status(item)
            mark = {OK: "[x]", WARN: "[!]", ERROR: "[E]"}[st]
            first = True
            for f in sorted(lines, key=lambda f: -_RANK[f.status]):
                head = f"{mark} {item:<{width}}  {st:5s}" if first else " " * (width + 11)
                tag = "" if first or f.status == st else f"({f.status}) "
                out.append(f"{head}  {tag}{f.message}")
                first = False
        ne, nw = len(self.errors), len(self.warnings)
        out.append(
            f"{ne} error(s), {nw} warning(s)" + (": fix the errors before submitting" if ne else "")
        )
        return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# The guide's judgements of the values against the published recipes


def _advice(plan: Plan, report: Report) -> None:
    run = plan.run
    t, d, o = run.train, run.data, run.optim
    dense = t.model_type == "llama"
    moe, assumed = plan.moe, ""
    if moe is None and not dense:  # the weights could not be read: judge the flags alone
        moe = MoEConfig(**{k: v for k, v in run.moe.overrides().items() if v is not None})
        assumed = f" (assuming {moe.num_experts} experts: the pretrained model could not be read)"
        for f in moe.check():
            if not f.is_error:  # its errors are the plan's already
                report.file(f)

    def ok(item: str, msg: str) -> None:
        if report.status(item) == OK:
            report.ok(item, msg)

    # a MoE config with errors (filed already) is not judged further: its numbers may not even
    # compute (--num_selects 0)
    judge = dense or not any(f.is_error for f in moe.check(None if assumed else plan.model))

    item = "balance loss weight"
    if dense:
        ok(item, "not used: model_type llama (dense)")
    elif judge:
        w = moe.gate_balance_loss_weight
        if w == 0:
            report.warn(
                item,
                "gate_balance_loss_weight=0: no balance loss, routing may collapse "
                "onto a few experts (the recipes use 1e-2)",
            )
        elif w > 0.1 or 0 < w < 1e-4:
            report.warn(
                item, f"gate_balance_loss_weight={fmt_value(w)} is far from the recipes' 1e-2"
            )
        else:
            ok(item, f"gate_balance_loss_weight={fmt_value(w)}")

    item = "scale factor"
    if dense:
        ok(item, "not used: model_type llama (dense)")
    elif judge:
        layers = plan.model.num_hidden_layers if plan.model else 1
        sfs = (
            sorted({moe.scale_factor(i) for i in range(layers)})
            if not assumed
            else ([moe.scale_factor(0)] if moe.score_scale_factor is not None else [])
        )
        src = "" if run.moe.score_scale_factor is not None else " (the pretrained model's)"
        if sfs:
            ok(
                item,
                f"moe_calculator_score_scale_factor={fmt_value(sfs)}{src} = #experts/#selected "
                f"= {moe.num_experts}/{moe.num_selects}{assumed}",
            )
        else:
            ok(item, "moe_calculator_score_scale_factor not given: the pretrained model's")

    item = "learning rate"
    lr = o.learning_rate
    if lr > 1e-3:
        report.warn(
            item,
            f"learning_rate={fmt_value(lr)} is high for continual pre-training from "
            "pretrained weights (recipes: 1e-4 .. 2e-4)",
        )
    elif 0 < lr < 1e-6:
        report.warn(
            item, f"learning_rate={fmt_value(lr)} is so low that the model will hardly move"
        )
    else:
        ok(item, f"learning_rate={fmt_value(lr)}, final_lr_portion={fmt_value(o.final_lr_portion)}")

    item = "global batch size"
    max_steps = plan.max_steps
    if plan.dp_size is not None:
        tpp = plan.world_size // plan.dp_size
        formula = (
            f"{d.per_device_train_batch_size} x {d.gradient_accumulation_steps} x "
            f"{plan.num_nodes} x {plan.gpus_per_node}"
            + (f" / (TP x PP = {tpp})" if tpp > 1 else "")
        )
        from .estimate import human_tokens

        ok(
            item,
            f"global batch size {plan.global_batch_size} = {formula}; #tokens/batch "
            f"{plan.tokens_per_batch}; max_steps {max_steps} "
            f"({human_tokens(max_steps * plan.tokens_per_batch)} tokens)",
        )
        if t.max_tokens is not None and t.max_tokens < plan.tokens_per_batch:
            report.warn(
                item,
                f"max_tokens={t.max_tokens} is less than one global batch "
                f"({plan.tokens_per_batch} tokens): one step",
            )
        if plan.tokens_per_batch > 16 * 2**20:
            report.warn(
                item,
                f"{plan.tokens_per_batch} tokens per batch is far above the recipes' 1.5M .. 15M",
            )

    item = "warmup steps"
    wu = o.warmup_steps
    if max_steps and wu >= max_steps:
        pass  # the plan's warning
    elif wu == 0:
        report.warn(
            item,
            "warmup_steps=0: starting from pretrained weights at full learning rate "
            "(recipes: 100 .. 2000)",
        )
    elif max_steps and wu > 0.1 * max_steps:
        report.warn(item, f"warmup_steps={wu} is more than 10% of max_steps={max_steps}")
    elif wu > 0:
        ok(item, f"warmup_steps={wu}" + (f" of {max_steps}" if max_steps else ""))

    item = "evaluation steps"
    ev, dyn = t.eval_steps, d.dynamic_data_selection
    if ev >= 0:
        if ev == 0 or (max_steps and ev > max_steps):
            if dyn == "none":
                report.warn(
                    item,
                    f"eval_steps={ev}: evaluated only at the end, no per-domain loss "
                    "curve during the run",
                )
        else:
            n = f" ({max_steps // ev} evaluations)" if max_steps else ""
            extra = f"; each one updates the {dyn} domain weights" if dyn != "none" else ""
            ok(item, f"eval_steps={ev}{n}{extra}")
    sv = t.save_steps
    if max_steps and (sv == 0 or sv > max_steps):
        report.warn(
            item,
            f"save_steps={sv}: only the final checkpoint; a job killed or preempted "
            "without warning restarts from scratch",
        )
    elif sv > 0 and max_steps:
        ok(item, f"save_steps={sv} ({max_steps // sv} checkpoints)")

    item = "logging steps"
    lg = t.logging_steps
    if lg >= 1:
        if (max_steps and lg > max_steps) or (ev and lg > ev):
            report.warn(
                item,
                f"logging_steps={lg} is larger than "
                + ("max_steps" if max_steps and lg > max_steps else f"eval_steps={ev}"),
            )
        else:
            ok(item, f"logging_steps={lg}")

    item = "number of selected experts"
    if dense:
        ok(item, "not used: model_type llama (dense)")
    elif judge:
        src = plan.source.moe if plan.source is not None else None
        note = (
            f" (the pretrained model was trained with top-{src.num_selects})"
            if src is not None and src.num_selects != moe.num_selects
            else ""
        )
        ok(
            item,
            f"num_selects={moe.num_selects} of {moe.num_experts} experts, "
            f"{moe.gate_type}{note}{assumed}",
        )

    item = "pretrained model"
    if plan.source is not None:
        kind = (
            "megamoe checkpoint"
            if plan.source.kind == "megamoe"
            else (
                f"Hugging Face {plan.source.meta.get('model_type')}, converted on the fly to "
                f"{plan.convert_to}"
            )
        )
        ok(item, f"{plan.source.path}: {kind}; trains {t.model_type} ({t.training_mode})")
    if not t.tokenizer_model:
        report.warn(item, "tokenizer_model is not set (the HF export will hold no tokenizer)")

    item = "data path"
    if plan.domains:
        ok(
            item,
            f"{d.dataset_dir}: {len(plan.domains)} domains {', '.join(plan.domains)}; "
            f"prob_map {plan.prob_map}" + (f", dynamic {dyn}" if dyn != "none" else ""),
        )
    if d.validation_dir:
        ok(item, f"validation_dir {d.validation_dir}")
    else:
        report.warn(item, "validation_dir is not set: no per-domain evaluation")

    item = "comment"
    c = t.comment.strip()
    if not c:
        report.warn(
            item,
            "no comment: say what this run tries (comment=... / --comment), so it "
            "can be told apart later",
        )
    else:
        ok(item, repr(c))


def _gpus(plan: Plan, report: Report, sbatch: Mapping[str, str] | None) -> None:
    item, pc = "GPUs", plan.run.parallel
    if sbatch is not None:
        nodes, gpus = sbatch_nodes_gpus(sbatch)
        where = (
            f"#SBATCH --nodes={sbatch['nodes']}"
            if sbatch.get("nodes")
            else "no #SBATCH --nodes: Slurm gives 1 node"
        )
        # a header without GPUs is warned about below; the command line may still add them
        _, _, found = job_shape(
            pc.num_nodes,
            pc.num_gpu_per_node,
            nodes or 1,
            gpus if gpus is not None else pc.num_gpu_per_node,
            where,
            allow_cpu=True,
        )
        for f in found:
            report.file(f)
        if gpus is None:
            report.warn(
                item,
                f"no #SBATCH --gres=gpu:N: the job gets no GPUs (only a CPU-only "
                f"cluster with MEGAMOE_ALLOW_CPU=1 runs that); expected "
                f"--gres=gpu:{pc.num_gpu_per_node or 'N'}",
            )
        tpn = sbatch.get("ntasks-per-node")
        if tpn is not None and tpn != "1":
            report.error(
                item,
                f"#SBATCH --ntasks-per-node={tpn}: always set it to 1 (one "
                "launcher per node; torchrun starts the GPU processes)",
            )
        try:
            cpt = int(sbatch.get("cpus-per-task") or 0)
        except ValueError:
            cpt = 0
        if cpt > 128:
            report.warn(item, f"#SBATCH --cpus-per-task={cpt}: a MoE node has at most 128 CPUs")
    if report.status(item) == ERROR or plan.dp_size is None:
        return
    layout = (
        ""
        if plan.world_size == plan.dp_size and pc.expert_model_parallel_size == 1
        else (
            f" (TP {pc.tensor_model_parallel_size}, PP {pc.pipeline_model_parallel_size}, "
            f"EP {pc.expert_model_parallel_size}, DP {plan.dp_size})"
        )
    )
    report.ok(
        item, f"{plan.num_nodes} node(s) x {plan.gpus_per_node} GPUs = {plan.world_size}{layout}"
    )
    if plan.model is not None:
        from .memory import estimate  # what the layout leaves on each GPU

        t = plan.run.train
        mem = estimate(
            plan.model,
            plan.moe,
            pc.tensor_model_parallel_size,
            pc.pipeline_model_parallel_size,
            pc.expert_model_parallel_size,
            plan.dp_size,
            plan.use_distributed_optimizer,
            bf16=t.bf16,
            lora=t.training_mode == "lora",
        )
        report.ok(item, f"memory: {mem.line()}")


def _slurm(t: Target, report: Report) -> None:
    sb, item = t.sbatch, SLURM_ITEM
    if not sb:
        report.warn(item, "no #SBATCH header: `sbatch` would run it with Slurm's defaults")
        return
    if "job-name" not in sb:
        report.warn(item, "no --job-name: outputs/<job-name>-<job-id> would use the script name")
    if "partition" not in sb:
        report.warn(item, "no --partition (the MoE group's partition is MoE)")
    for key in ("output", "error"):
        val = sb.get(key)
        if val:
            d = os.path.dirname(val)
            if d and "%" not in d and not os.path.isdir(d):
                report.warn(
                    item,
                    f"--{key}={val}: directory {d}/ does not exist here; Slurm "
                    f"cannot create it (mkdir -p {d} before sbatch)",
                )
    sig = sb.get("signal", "")
    if not sig:
        report.warn(
            item,
            "no --signal: the job is killed at its time limit without a final "
            "checkpoint; add #SBATCH --signal=B:USR1@300",
        )
    elif sig.upper().split("@")[0].removeprefix("B:").removeprefix("SIG") not in ("USR1", "10"):
        report.warn(
            item, f"--signal={sig}: the trainer checkpoints on USR1 (or TERM); use B:USR1@300"
        )
    elif not sig.upper().startswith("B:"):
        report.warn(
            item,
            f"--signal={sig} without B: goes to all job steps, not to the launcher "
            "that requeues; use B:USR1@300",
        )
    if "requeue" not in sb and "no-requeue" not in sb:
        report.warn(item, "no --requeue: a preempted job is not resumed automatically")
    if sb.get("requeue") is not None and sb.get("open-mode") != "append":
        report.warn(item, "--requeue without --open-mode=append: a requeued job overwrites its log")
    if t.argv and not t.launch_exec:
        report.warn(
            item,
            "scripts/launch.sh is not started with `exec`: the batch shell, not the "
            "launcher, receives --signal=B:USR1 and the trainer never hears of it",
        )
    if not report.items.get(item):
        report.ok(
            item,
            f"job-name {sb.get('job-name')}, partition {sb.get('partition')}, "
            f"signal {sig}, requeue, logs {sb.get('output')}",
        )


def _cuda_for(sbatch: Mapping[str, str] | None, env: Mapping[str, str]) -> bool | None:
    """Whether the run will have CUDA: a script asks for GPUs in its header; a job has them in
    its environment; otherwise this machine decides (None)."""
    if sbatch is not None:
        return sbatch_nodes_gpus(sbatch)[1] is not None
    if env.get("SLURM_JOB_ID"):
        return slurm_gpus_per_node(env) is not None
    return None


def check_run(
    argv: Sequence[str] = (),
    config: dict | None = None,
    *,
    sbatch: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    report: Report | None = None,
) -> Report:
    """The checklist for trainer flags and/or config keys."""
    env = dict(os.environ if env is None else env)
    report = report or Report()
    try:
        run = parse_run(argv, config)
    except OptionsError as e:
        report.error("flags", str(e))
        return report
    t, pc = run.train, run.parallel
    if not t.output_dir:  # scripts leave it to the launcher: outputs/<job-name>-<job-id>
        t.output_dir = os.path.join("outputs", f"{(sbatch or {}).get('job-name', 'run')}-JOBID")
    nodes, gpus = sbatch_nodes_gpus(sbatch) if sbatch is not None else (None, None)
    nn = pc.num_nodes or nodes or 1
    ng = pc.num_gpu_per_node or gpus or 1
    world = {"WORLD_SIZE": str(max(1, nn) * max(1, ng)), "LOCAL_WORLD_SIZE": str(max(1, ng))}
    plan, findings = make_plan(run, env=world, cuda=_cuda_for(sbatch, env))
    for f in findings:
        report.file(f)
    _advice(plan, report)
    _gpus(plan, report, sbatch)
    for it in CHECKLIST:
        if it not in report.items:
            report.ok(it, "-")
    return report


def check_flags(
    argv: Sequence[str], env: Mapping[str, str] | None = None, source: str = ""
) -> Report:
    """The checklist for trainer flags (what scripts/launch.sh runs before starting a job)."""
    return check_run(argv, env=env, report=Report(source=source))


def check_target(path: str, env: Mapping[str, str] | None = None) -> Report:
    """`megamoe check PATH`: an sbatch script or a YAML/JSON config."""
    t = read_target(path, env)
    report = Report(source=path)
    for p in t.problems:
        report.error("flags", p)
    for n in t.notes:
        report.warn("flags", n)
    if t.kind == "config":
        return report if t.problems else check_run([], t.config, env=env, report=report)
    if not t.problems:
        check_run(t.argv, sbatch=t.sbatch, env=env, report=report)
        report.summary.append("flags: " + shlex.join(t.argv))
        if report.errors:
            report.summary.append(
                f"(the script's variables can be overridden from the "
                f"environment: e.g. pretrained_model=/path sbatch {path})"
            )
    _slurm(t, report)
    return report


def _check(argv: Sequence[str], prog: str) -> int:
    p = FlagParser(
        prog=prog,
        description="The training guide's checklist as a pre-flight report "
        "of an sbatch script (read, never run) or a YAML/JSON config.",
    )
    p.add_argument("target", help="an sbatch script (scripts/cpt/...sh) or a YAML/JSON config")
    p.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")
    args = p.parse_args(argv)
    try:
        report = check_target(args.target)
    except FileNotFoundError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    print(report.render())
    return 1 if report.errors or (args.strict and report.warnings) else 0


def main(argv: Sequence[str] | None = None, prog: str = "megamoe check") -> int:
    """0: no errors; 1: errors (or warnings with --strict); 2: no such file."""
    return run_command(prog, _check, argv)
