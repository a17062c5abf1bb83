"""`megamoe check SCRIPT_OR_CONFIG`: the training guide's checklist as a pre-flight report.

    - [ ] balance loss weight        - [ ] global batch size
    - [ ] scale factor               - [ ] number of selected experts
    - [ ] learning rate              - [ ] pretrained model
    - [ ] warmup steps               - [ ] data path
    - [ ] evaluation steps           - [ ] GPUs
    - [ ] logging steps              - [ ] comment

An sbatch script is read the way Slurm and bash read it: its #SBATCH header (up to the first
command), and the flags it passes to scripts/launch.sh, obtained by running the script with
MEGAMOE_LAUNCH_DRY_RUN set (launch.sh then records its arguments and starts nothing), so
variables, defaults overridden by the environment and arithmetic are those a real submission
would see. A YAML/JSON config gives the trainer's keys directly. The flags are parsed by the
trainer's own parser (megamoe.config), never a copy of it.

Each item is OK, WARN or ERROR; `megamoe check` exits 1 when any is an ERROR. scripts/launch.sh
runs the same checks before starting a job and refuses on errors.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


OK, WARN, ERROR = "OK", "WARN", "ERROR"
_RANK = {OK: 0, WARN: 1, ERROR: 2}
CHECKLIST = ["balance loss weight", "scale factor", "learning rate", "warmup steps",
             "evaluation steps", "logging steps", "global batch size",
             "number of selected experts", "pretrained model", "data path", "GPUs", "comment"]
SLURM_ITEM = "slurm"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NUM_EXPERTS = 16


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

@dataclass
class Finding:
    status: str
    message: str


@dataclass
class Report:
    source: str = ""
    items: dict[str, list[Finding]] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)

    def add(self, item: str, status: str, message: str) -> None:
        self.items.setdefault(item, []).append(Finding(status, message))

    def ok(self, item: str, message: str) -> None:
        self.add(item, OK, message)

    def warn(self, item: str, message: str) -> None:
        self.add(item, WARN, message)

    def error(self, item: str, message: str) -> None:
        self.add(item, ERROR, message)

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
            k for k in self.items if k not in CHECKLIST]

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
            findings = self.items[item]
            st = self.status(item)
            mark = {OK: "[x]", WARN: "[!]", ERROR: "[E]"}[st]
            first = True
            for f in sorted(findings, key=lambda f: -_RANK[f.status]):
                head = f"{mark} {item:<{width}}  {st:5s}" if first else " " * (width + 11)
                tag = "" if first or f.status == st else f"({f.status}) "
                out.append(f"{head}  {tag}{f.message}")
                first = False
        ne, nw = len(self.errors), len(self.warnings)
        out.append(f"{ne} error(s), {nw} warning(s)" + (
            ": fix the errors before submitting" if ne else ""))
        return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Reading a script or a config
# ------------------------------------------------------------------------------------------------

@dataclass
class Target:
    path: str
    kind: str  # "script" | "config" | "flags"
    argv: list[str] = field(default_factory=list)  # trainer flags (script / flags)
    config: dict = field(default_factory=dict)  # keys (config file)
    sbatch: dict[str, str] = field(default_factory=dict)  # #SBATCH options
    text: str = ""
    problems: list[str] = field(default_factory=list)


def parse_sbatch_header(text: str) -> dict[str, str]:
    """#SBATCH options of a script, as sbatch reads them: lines before the first command.
    Short options are mapped to long names (-N nodes, -J job-name, -o output, -e error,
    -p partition, -c cpus-per-task, -n ntasks, -t time)."""
    short = {"N": "nodes", "J": "job-name", "o": "output", "e": "error", "p": "partition",
             "c": "cpus-per-task", "n": "ntasks", "t": "time", "G": "gpus"}
    opts: dict[str, str] = {}
    for i, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if i == 0 and line.startswith("#!"):
            continue
        if not line or (line.startswith("#") and not line.startswith("#SBATCH")):
            continue
        if not line.startswith("#SBATCH"):
            break  # sbatch stops at the first command
        rest = line[len("#SBATCH"):].strip()
        rest = rest.split(" #", 1)[0].strip()
        try:
            toks = shlex.split(rest)
        except ValueError:
            toks = rest.split()
        j = 0
        while j < len(toks):
            t = toks[j]
            if t.startswith("--"):
                if "=" in t:
                    k, v = t[2:].split("=", 1)
                elif j + 1 < len(toks) and not toks[j + 1].startswith("-"):
                    k, v = t[2:], toks[j + 1]
                    j += 1
                else:
                    k, v = t[2:], ""
                opts[k] = v
            elif t.startswith("-") and len(t) >= 2:
                k = short.get(t[1], t[1])
                if len(t) > 2:
                    v = t[2:].lstrip("=")
                elif j + 1 < len(toks):
                    v = toks[j + 1]
                    j += 1
                else:
                    v = ""
                opts[k] = v
            j += 1
    return opts


def script_flags(path: str, env: Optional[Mapping[str, str]] = None,
                 timeout: float = 60) -> tuple[Optional[list[str]], str]:
    """Run the script with MEGAMOE_LAUNCH_DRY_RUN: the flags it passes to scripts/launch.sh.
    Returns (argv or None, diagnostic)."""
    with tempfile.TemporaryDirectory(prefix="megamoe-check-") as tmp:
        out = os.path.join(tmp, "argv")
        e = dict(os.environ if env is None else env)
        e["MEGAMOE_LAUNCH_DRY_RUN"] = out
        e.setdefault("MEGAMOE_ROOT", str(REPO_ROOT))
        try:
            r = subprocess.run(["bash", path], env=e, cwd=os.getcwd(), stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"the script did not finish within {timeout:.0f}s in dry-run mode"
        if not os.path.exists(out):
            tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
            return None, ("the script never called scripts/launch.sh (exit code "
                          f"{r.returncode}){': ' + ' | '.join(tail) if tail else ''}")
        data = Path(out).read_bytes().decode()
        argv = data.split("\0")
        if argv and argv[-1] == "":
            argv.pop()
        return argv, ""


def load_config_file(path: str) -> dict:
    """A YAML/JSON config -> {flag name: value}, by the trainer's loader."""
    from .config import ConfigError, load_config_file as load
    try:
        return load(path)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def read_target(path: str, env: Optional[Mapping[str, str]] = None) -> Target:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            return Target(path, "config", config=load_config_file(path))
        except ValueError as e:
            return Target(path, "config", problems=[str(e)])
    text = p.read_text()
    t = Target(path, "script", sbatch=parse_sbatch_header(text), text=text)
    argv, diag = script_flags(path, env)
    if argv is None:
        t.problems.append(diag)
    else:
        t.argv = argv
    return t


# ------------------------------------------------------------------------------------------------
# Options: the trainer's parser turns flags / config keys into values
# ------------------------------------------------------------------------------------------------

class OptionsError(ValueError):
    pass


def parse_run(argv: Sequence[str] = (), config: Optional[dict] = None):
    """Flags (and/or config keys) -> the trainer's RunConfig, through megamoe.config's parser
    (the one `python -m megamoe.train` uses). Raises OptionsError with the parser's message."""
    import contextlib
    import io

    from .config import ConfigError, parse_run_config
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_run_config(list(argv), config)
    except ConfigError as e:
        raise OptionsError(str(e)) from None
    except SystemExit:
        msg = [ln for ln in err.getvalue().splitlines() if "error:" in ln]
        raise OptionsError(msg[-1].split("error:", 1)[1].strip() if msg else
                           "the trainer rejected the flags") from None


def resolve_options(argv: Sequence[str] = (), config: Optional[dict] = None) -> dict[str, Any]:
    """{flag name: value} over every trainer flag, defaults included."""
    return parse_run(argv, config).flat()


# ------------------------------------------------------------------------------------------------
# The trainer's own pre-flight (megamoe.train.preflight.plan): its errors and warnings, filed
# under the checklist item they concern
# ------------------------------------------------------------------------------------------------

_ITEM_OF_FLAG = {
    "gate_balance_loss_weight": "balance loss weight",
    "moe_calculator_score_scale_factor": "scale factor",
    "learning_rate": "learning rate", "final_lr_portion": "learning rate",
    "warmup_steps": "warmup steps",
    "eval_steps": "evaluation steps", "save_steps": "evaluation steps",
    "save_total_limit": "evaluation steps", "per_device_eval_batch_size": "evaluation steps",
    "max_eval_blocks": "evaluation steps",
    "logging_steps": "logging steps",
    "block_size": "global batch size", "per_device_train_batch_size": "global batch size",
    "gradient_accumulation_steps": "global batch size", "max_steps": "global batch size",
    "max_tokens": "global batch size",
    "num_selects": "number of selected experts", "num_experts": "number of selected experts",
    "gate_type": "number of selected experts", "gate_network_type": "number of selected experts",
    "pretrained_model": "pretrained model", "model_type": "pretrained model",
    "tokenizer_model": "pretrained model", "training_mode": "pretrained model",
    "lora_rank": "pretrained model", "lora_dropout": "pretrained model",
    "lora_targets": "pretrained model",
    "dataset_dir": "data path", "validation_dir": "data path", "prob_map": "data path",
    "ref_loss": "data path", "dynamic_data_selection": "data path",
    "num_nodes": "GPUs", "num_gpu_per_node": "GPUs", "tensor_model_parallel_size": "GPUs",
    "pipeline_model_parallel_size": "GPUs", "expert_model_parallel_size": "GPUs",
    "sequence_parallel": "GPUs", "use_distributed_optimizer": "GPUs", "overlap_grad_reduce": "GPUs",
    "ddp_bucket_size": "GPUs",
    "comment": "comment",
}


def item_of(message: str) -> str:
    """The checklist item a trainer message is about: that of the first flag it names."""
    if "world size" in message:
        return "GPUs"
    if message.startswith("--dynamic_data_selection") and "--eval_steps" in message:
        return "evaluation steps"
    for m in re.finditer(r"--([a-z_0-9]+)", message):
        if m.group(1) in _ITEM_OF_FLAG:
            return _ITEM_OF_FLAG[m.group(1)]
    if "tensor_model_parallel" in message or "sequence parallel" in message:
        return "GPUs"
    return "other"


@dataclass
class TrainerView:
    """What the trainer's pre-flight resolved (None where it found errors)."""
    plan: Any = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def trainer_preflight(run, num_nodes: int, num_gpu_per_node: int,
                      cuda: Optional[bool]) -> TrainerView:
    """megamoe.train.preflight.plan(run) for a world of num_nodes x num_gpu_per_node."""
    from .config import ConfigError
    from .train import preflight as tpf
    world = max(1, num_nodes) * max(1, num_gpu_per_node)
    env = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(max(1, num_gpu_per_node))}
    try:
        plan = tpf.plan(run, env=env, cuda=cuda)
    except ConfigError as e:
        return TrainerView(errors=[x for x in str(e).splitlines() if x.strip()])
    return TrainerView(plan=plan, warnings=list(plan.warnings))


# ------------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------------

def _f(x: Any) -> Optional[float]:
    if x is None or x == "":
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _i(x: Any) -> Optional[int]:
    v = _f(x)
    return None if v is None else int(v)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, list):
        return ",".join(_fmt(v) for v in x)
    return str(x)


def source_moe(path: Optional[str]) -> dict:
    """The MoE fields (num_experts, num_selects, ...) of a pretrained model directory, read
    cheaply: a megamoe checkpoint's megamoe.json or a Hugging Face config.json; {} otherwise."""
    if not path:
        return {}
    p = Path(path)
    try:
        if (p / "megamoe.json").is_file():
            return dict(json.loads((p / "megamoe.json").read_text()).get("moe") or {})
        if (p / "config.json").is_file():
            conf = json.loads((p / "config.json").read_text())
            return {k: conf[k] for k in ("num_experts", "num_selects") if k in conf}
    except (OSError, ValueError):
        pass
    return {}


def check_options(o: Mapping[str, Any], report: Report, view: Optional[TrainerView] = None,
                  sbatch: Optional[Mapping[str, str]] = None) -> Report:
    """Fill `report` with the checklist for the options `o` (flag name -> value, as parsed by
    the trainer) and what the trainer's pre-flight made of them (`view`): its errors and
    warnings, plus the guide's judgement of each value against the published recipes."""
    view = view or TrainerView()
    plan = view.plan
    for msg in view.errors:
        report.error(item_of(msg), msg)
    moe = str(o.get("model_type") or "llama_moe") == "llama_moe"
    mcfg = plan.moe if plan is not None else None
    src = source_moe(o.get("pretrained_model")) if mcfg is None else {}
    known = bool(mcfg or src.get("num_experts") or o.get("num_experts"))
    num_experts = mcfg.num_experts if mcfg else (
        _i(o.get("num_experts")) or _i(src.get("num_experts")) or DEFAULT_NUM_EXPERTS)
    k = mcfg.num_selects if mcfg else (_i(o.get("num_selects")) or _i(src.get("num_selects")))
    assumed = "" if known else (f" (assuming {num_experts} experts: the pretrained model "
                                "could not be read)")
    own_warn: set[str] = set()

    def warn(item: str, msg: str) -> None:
        own_warn.add(item)
        report.warn(item, msg)

    def ok(item: str, msg: str) -> None:
        if report.status(item) == OK:
            report.ok(item, msg)

    # balance loss weight
    item = "balance loss weight"
    w = mcfg.gate_balance_loss_weight if mcfg else _f(o.get("gate_balance_loss_weight"))
    if not moe:
        ok(item, "not used: model_type llama (dense)")
    elif w is not None and w == 0:
        warn(item, "gate_balance_loss_weight=0: no balance loss, routing may collapse onto a few "
                   "experts (the recipes use 1e-2)")
    elif w is not None and w > 0 and (w > 0.1 or w < 1e-4):
        warn(item, f"gate_balance_loss_weight={_fmt(w)} is far from the recipes' 1e-2")
    elif w is not None:
        ok(item, f"gate_balance_loss_weight={_fmt(w)}")

    # scale factor
    item = "scale factor"
    if not moe:
        ok(item, "not used: model_type llama (dense)")
    elif mcfg is not None and plan.model is not None:
        want = num_experts / k
        sfs = sorted({mcfg.scale_factor(i) for i in range(plan.model.num_hidden_layers)})
        given = o.get("moe_calculator_score_scale_factor")
        src = "" if given is not None else " (the pretrained model's)"
        if any(v <= 0 or not math.isfinite(v) for v in sfs):
            report.error(item, f"moe_calculator_score_scale_factor={_fmt(sfs)} must be positive")
        elif all(math.isclose(v, want, rel_tol=1e-6) for v in sfs):
            ok(item, f"moe_calculator_score_scale_factor={_fmt(sfs)}{src} = #experts/#selected "
                     f"= {num_experts}/{k}")
        # otherwise the trainer's warning (SF is not E/K) is filed below
    elif k and k > 0:
        sf = o.get("moe_calculator_score_scale_factor")
        sfs = sf if isinstance(sf, list) else [sf]
        if sf is None:
            ok(item, "moe_calculator_score_scale_factor not given: the pretrained model's")
        elif any(v <= 0 for v in sfs):
            report.error(item, f"moe_calculator_score_scale_factor={_fmt(sf)} must be positive")
        elif not all(math.isclose(float(v), num_experts / k, rel_tol=1e-6) for v in sfs):
            warn(item, f"moe_calculator_score_scale_factor={_fmt(sf)} but #experts/#selected = "
                       f"{num_experts}/{k} = {num_experts / k:g}{assumed}")
        else:
            ok(item, f"moe_calculator_score_scale_factor={_fmt(sf)} = {num_experts}/{k}{assumed}")

    # learning rate
    item = "learning rate"
    lr = _f(o.get("learning_rate"))
    if lr is not None and lr > 0:
        if lr > 1e-3:
            warn(item, f"learning_rate={_fmt(lr)} is high for continual pre-training from "
                       "pretrained weights (recipes: 1e-4 .. 2e-4)")
        elif lr < 1e-6:
            warn(item, f"learning_rate={_fmt(lr)} is so low that the model will hardly move")
        else:
            ok(item, f"learning_rate={_fmt(lr)}, final_lr_portion={_fmt(o.get('final_lr_portion'))}")

    # global batch size (and max_steps for the items below)
    item = "global batch size"
    max_steps = plan.max_steps if plan is not None else _i(o.get("max_steps"))
    if plan is not None:
        d = plan.run.data
        tpp = plan.world_size // plan.dp_size
        formula = (f"{d.per_device_train_batch_size} x {d.gradient_accumulation_steps} x "
                   f"{plan.num_nodes} x {plan.gpus_per_node}" + (f" / (TP x PP = {tpp})"
                                                                 if tpp > 1 else ""))
        from .estimate import human_tokens
        tokens = plan.max_steps * plan.tokens_per_batch
        ok(item, f"global batch size {plan.global_batch_size} = {formula}; #tokens/batch "
                 f"{plan.tokens_per_batch}; max_steps {plan.max_steps} ({human_tokens(tokens)} "
                 "tokens)")
        mt = plan.run.train.max_tokens
        if mt is not None and mt < plan.tokens_per_batch:
            warn(item, f"max_tokens={mt} is less than one global batch ({plan.tokens_per_batch} "
                       "tokens): one step")
        if plan.tokens_per_batch > 16 * 2 ** 20:
            warn(item, f"{plan.tokens_per_batch} tokens per batch is far above the recipes' "
                       "1.5M .. 15M")
    else:
        from .estimate import Estimate
        vals = {key: _i(o.get(key)) for key in (
            "block_size", "per_device_train_batch_size", "gradient_accumulation_steps",
            "num_nodes", "num_gpu_per_node", "tensor_model_parallel_size",
            "pipeline_model_parallel_size")}
        vals["num_nodes"] = vals["num_nodes"] or 1
        vals["num_gpu_per_node"] = vals["num_gpu_per_node"] or 1
        if all(v and v > 0 for v in vals.values()):
            e = Estimate(tokens=float(o.get("max_tokens") or 0), **vals)
            if e.num_gpus % (e.tensor_model_parallel_size * e.pipeline_model_parallel_size) == 0:
                if not max_steps and o.get("max_tokens"):
                    max_steps = e.max_steps
                ok(item, f"global batch size {e.global_batch_size}; #tokens/batch "
                         f"{e.tokens_per_batch}" + (f"; max_steps {max_steps}" if max_steps else ""))

    # warmup steps
    item = "warmup steps"
    wu = _i(o.get("warmup_steps"))
    if wu is not None and wu >= 0:
        if max_steps and wu >= max_steps:
            pass  # the trainer's warning
        elif wu == 0:
            warn(item, "warmup_steps=0: starting from pretrained weights at full learning rate "
                       "(recipes: 100 .. 2000)")
        elif max_steps and wu > 0.1 * max_steps:
            warn(item, f"warmup_steps={wu} is more than 10% of max_steps={max_steps}")
        else:
            ok(item, f"warmup_steps={wu}" + (f" of {max_steps}" if max_steps else ""))

    # evaluation steps (and checkpoints)
    item = "evaluation steps"
    ev = _i(o.get("eval_steps"))
    dyn = str(o.get("dynamic_data_selection") or "none")
    if ev is not None and ev >= 0:
        if ev == 0 or (max_steps and ev > max_steps):
            if dyn == "none":
                warn(item, f"eval_steps={ev}: evaluated only at the end, no per-domain loss curve "
                           "during the run")
        else:
            n = f" ({max_steps // ev} evaluations)" if max_steps else ""
            extra = f"; each one updates the {dyn} domain weights" if dyn != "none" else ""
            ok(item, f"eval_steps={ev}{n}{extra}")
    sv = _i(o.get("save_steps"))
    if sv is not None and max_steps and (sv == 0 or sv > max_steps):
        warn(item, f"save_steps={sv}: only the final checkpoint; a job killed or preempted "
                   "without warning restarts from scratch")
    elif sv and max_steps:
        ok(item, f"save_steps={sv} ({max_steps // sv} checkpoints)")

    # logging steps
    item = "logging steps"
    lg = _i(o.get("logging_steps"))
    if lg is not None and lg >= 1:
        if (max_steps and lg > max_steps) or (ev and lg > ev):
            warn(item, f"logging_steps={lg} is larger than "
                       + ("max_steps" if max_steps and lg > max_steps else f"eval_steps={ev}"))
        else:
            ok(item, f"logging_steps={lg}")

    # number of selected experts
    item = "number of selected experts"
    if not moe:
        ok(item, "not used: model_type llama (dense)")
    elif mcfg is not None:
        src = plan.source_meta.get("moe") or {} if plan.source_kind == "megamoe" else {}
        ck = src.get("num_selects")
        note = f" (the pretrained model was trained with top-{ck})" if ck and ck != k else ""
        ok(item, f"num_selects={k} of {num_experts} experts, {mcfg.gate_type}{note}")
    elif k is not None:
        ok(item, f"num_selects={k} of {num_experts} experts{assumed}")

    # pretrained model
    item = "pretrained model"
    if plan is not None:
        kind = "megamoe checkpoint" if plan.source_kind == "megamoe" else (
            f"Hugging Face {plan.source_meta.get('model_type')}, converted on the fly to "
            f"{plan.convert_to}")
        ok(item, f"{plan.run.train.pretrained_model}: {kind}; trains {o.get('model_type')} "
                 f"({o.get('training_mode')})")
    if not o.get("tokenizer_model"):
        warn(item, "tokenizer_model is not set (the HF export will hold no tokenizer)")

    # data path
    item = "data path"
    if plan is not None:
        ok(item, f"{plan.run.data.dataset_dir}: {len(plan.domains)} domains "
                 f"{', '.join(plan.domains)}; prob_map {plan.prob_map}"
                 + (f", dynamic {dyn}" if dyn != "none" else ""))
        if plan.run.data.validation_dir:
            ok(item, f"validation_dir {plan.run.data.validation_dir}")
    else:
        ok(item, f"dataset_dir {o.get('dataset_dir')}, validation_dir {o.get('validation_dir')}, "
                 f"prob_map {o.get('prob_map')}")
    if not o.get("validation_dir"):
        warn(item, "validation_dir is not set: no per-domain evaluation")

    # GPUs
    _check_gpus(o, report, sbatch, plan)

    # comment
    item = "comment"
    c = str(o.get("comment") or "").strip()
    if not c:
        warn(item, "no comment: say what this run tries (comment=... / --comment), so it can be "
                   "told apart later")
    else:
        ok(item, repr(c))

    # the trainer's warnings, where this report has not already said the same
    for msg in view.warnings:
        it = item_of(msg)
        if it not in own_warn:
            report.warn(it, msg)
    for it in CHECKLIST:
        if it not in report.items:
            report.ok(it, "-")
    return report


def _sbatch_nodes_gpus(sbatch: Mapping[str, str]) -> tuple[Optional[int], Optional[int]]:
    """(--nodes, GPUs per node from --gres/--gpus-per-node) of an #SBATCH header."""
    from .launch import _count_gres
    nodes = None
    if sbatch.get("nodes"):
        try:
            nodes = int(str(sbatch["nodes"]).split("-")[0])
        except ValueError:
            pass
    gpus = None
    gres = sbatch.get("gres")
    if gres and gres != "none":
        gpus = _count_gres(gres)
    elif sbatch.get("gpus-per-node"):
        gpus = _count_gres(sbatch["gpus-per-node"], all_gpus=True)
    return nodes, gpus


def _check_gpus(o: Mapping[str, Any], report: Report, sbatch: Optional[Mapping[str, str]],
                plan: Any) -> None:
    item = "GPUs"
    nn, ng = _i(o.get("num_nodes")), _i(o.get("num_gpu_per_node"))
    if sbatch is not None:
        nodes, gpus = _sbatch_nodes_gpus(sbatch)
        if nodes is None:
            nodes = 1
            if sbatch.get("nodes") is None and (nn or 1) != 1:
                report.error(item, f"num_nodes={nn} but the header has no #SBATCH --nodes "
                                   f"(Slurm gives 1 node): add #SBATCH --nodes={nn}")
        if nn is not None and nn != nodes and sbatch.get("nodes") is not None:
            report.error(item, f"num_nodes={nn} but #SBATCH --nodes={sbatch['nodes']}: they must be "
                               f"the same (scripts/launch.sh refuses to start)")
        if gpus is None:
            report.warn(item, f"no #SBATCH --gres=gpu:N: the job gets no GPUs (only a CPU-only "
                              f"cluster with MEGAMOE_ALLOW_CPU=1 runs that); expected "
                              f"--gres=gpu:{ng or 'N'}")
        elif ng is not None and gpus != ng:
            report.error(item, f"num_gpu_per_node={ng} but #SBATCH --gres={sbatch.get('gres')}: "
                               f"they must agree (set --gres=gpu:{ng} or num_gpu_per_node={gpus})")
        tpn = sbatch.get("ntasks-per-node")
        if tpn is not None and tpn != "1":
            report.error(item, f"#SBATCH --ntasks-per-node={tpn}: always set it to 1 (one launcher "
                               "per node; torchrun starts the GPU processes)")
        cpt = _i(sbatch.get("cpus-per-task"))
        if cpt and cpt > 128:
            report.warn(item, f"#SBATCH --cpus-per-task={cpt}: a MoE node has at most 128 CPUs")
    if plan is None and report.status(item) == OK and nn and ng:
        report.ok(item, f"{nn} node(s) x {ng} GPUs = {nn * ng}")
    if plan is not None and report.status(item) != ERROR:
        pc = plan.run.parallel
        layout = "" if plan.world_size == plan.dp_size and pc.expert_model_parallel_size == 1 else (
            f" (TP {pc.tensor_model_parallel_size}, PP {pc.pipeline_model_parallel_size}, "
            f"EP {pc.expert_model_parallel_size}, DP {plan.dp_size})")
        report.ok(item, f"{plan.num_nodes} node(s) x {plan.gpus_per_node} GPUs = "
                        f"{plan.world_size}{layout}")
        from .memory import estimate  # what the layout leaves on each GPU
        t = plan.run.train
        mem = estimate(plan.model, plan.moe, pc.tensor_model_parallel_size,
                       pc.pipeline_model_parallel_size, pc.expert_model_parallel_size, plan.dp_size,
                       plan.use_distributed_optimizer, bf16=t.bf16, lora=t.training_mode == "lora")
        report.ok(item, f"memory: {mem.line()}")


def _check_slurm(t: Target, report: Report) -> None:
    sb = t.sbatch
    item = SLURM_ITEM
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
                report.warn(item, f"--{key}={val}: directory {d}/ does not exist here; Slurm "
                                  f"cannot create it (mkdir -p {d} before sbatch)")
    sig = sb.get("signal", "")
    if not sig:
        report.warn(item, "no --signal: the job is killed at its time limit without a final "
                          "checkpoint; add #SBATCH --signal=B:USR1@300")
    elif "USR1" not in sig.upper() and "10" not in sig:
        report.warn(item, f"--signal={sig}: the trainer checkpoints on USR1 (or TERM); use "
                          "B:USR1@300")
    elif not sig.upper().startswith("B:"):
        report.warn(item, f"--signal={sig} without B: goes to all job steps, not to the launcher "
                          "that requeues; use B:USR1@300")
    if "requeue" not in sb and "no-requeue" not in sb:
        report.warn(item, "no --requeue: a preempted job is not resumed automatically")
    if sb.get("requeue") is not None and sb.get("open-mode") != "append":
        report.warn(item, "--requeue without --open-mode=append: a requeued job overwrites its log")
    if t.text and not re.search(r"^\s*exec\s+(bash\s+|sh\s+)?\S*launch\.sh", t.text, re.M):
        report.warn(item, "scripts/launch.sh is not started with `exec`: the batch shell, not the "
                          "launcher, receives --signal=B:USR1 and the trainer never hears of it")
    if not report.items.get(item):
        report.ok(item, f"job-name {sb.get('job-name')}, partition {sb.get('partition')}, "
                        f"signal {sig}, requeue, logs {sb.get('output')}")


def _cuda_for(sbatch: Optional[Mapping[str, str]], env: Mapping[str, str]) -> Optional[bool]:
    """Whether the run will have CUDA: a script asks for GPUs in its header; a job has them in
    its environment; otherwise this machine decides (None)."""
    if sbatch is not None:
        return _sbatch_nodes_gpus(sbatch)[1] is not None
    if env.get("SLURM_JOB_ID"):
        from .launch import slurm_gpus_per_node
        return slurm_gpus_per_node(env) is not None
    return None


def check_run(argv: Sequence[str] = (), config: Optional[dict] = None, *,
              sbatch: Optional[Mapping[str, str]] = None, env: Optional[Mapping[str, str]] = None,
              report: Optional[Report] = None) -> Report:
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
    nodes, gpus = _sbatch_nodes_gpus(sbatch) if sbatch is not None else (None, None)
    nn = pc.num_nodes or nodes or 1
    ng = pc.num_gpu_per_node or gpus or 1
    view = trainer_preflight(run, nn, ng, _cuda_for(sbatch, env))
    o = run.flat()
    return check_options(o, report, view, sbatch=sbatch)


def check_flags(argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
                source: str = "") -> Report:
    """The checklist for trainer flags (what scripts/launch.sh runs before starting a job)."""
    return check_run(argv, env=env, report=Report(source=source))


def check_target(path: str, env: Optional[Mapping[str, str]] = None) -> Report:
    """`megamoe check PATH`: an sbatch script or a YAML/JSON config."""
    t = read_target(path, env)
    report = Report(source=path)
    if t.kind == "config":
        if t.problems:
            for p in t.problems:
                report.error("flags", p)
            return report
        return check_run([], t.config, env=env, report=report)
    if t.problems:
        for p in t.problems:
            report.error("flags", p)
    else:
        check_run(t.argv, sbatch=t.sbatch, env=env, report=report)
        report.summary.append("flags: " + shlex.join(t.argv))
        if report.errors:
            report.summary.append(f"(the script's variables can be overridden from the "
                                  f"environment: e.g. pretrained_model=/path sbatch {path})")
    _check_slurm(t, report)
    return report
