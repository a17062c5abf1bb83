"""The training run: set up, resume, loop, evaluate, save, export.

Per step (every rank): the next global batch from the domain sampler (this data-parallel rank's
share), split into gradient_accumulation_steps micro-batches; megatron-core's schedule runs
forward/backward (step.py; the balance loss reaches the gradients inside the MoE layers);
losses averaged over data-parallel ranks; a non-finite loss or gradient norm stops the run
before the update (the last good checkpoint stays the newest); the learning rate of the
schedule; AdamW with clipping (optim.py). Every eval_steps: every domain's validation loss,
the dynamic domain weights updated from them, routing statistics per domain. Every save_steps
and at the end: a checkpoint (model, optimizer, sampler/data state, schedule, per-rank RNG),
older ones rotated away. SIGTERM / SIGUSR1: checkpoint at the next step boundary, exit 0.

Resuming (automatic, from the newest complete checkpoint in --output_dir) restores the weights,
optimizer, data order and domain weights, RNG streams and counters, so the loss curve continues
as if uninterrupted (bit for bit on CPU).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import layout as ckpt
from ..command import INTERRUPTED
from ..config import RunConfig, to_dict
from .logs import RunLogger, default_logging_dir, fmt_duration, specialisation
from .plan import Plan


class TrainingStopped(RuntimeError):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _clean_env() -> dict:
    """The environment for a helper process that must be a world of one."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "ROLE_RANK",
            "ROLE_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "GROUP_WORLD_SIZE",
        )
        and not k.startswith("TORCHELASTIC")
    }
    return env  # without RANK it starts a world of one on an in-process store (no port)


def ensure_converted(plan: Plan, say) -> None:
    """--pretrained_model is an HF directory: rank 0 converts it (`megamoe convert` in a
    world-of-one subprocess) into plan.convert_to unless a matching conversion is there; the
    other ranks wait for it. Before torch.distributed starts, so no collective times out."""
    target = plan.convert_to
    if target is None:
        return
    run = plan.run
    src = os.path.abspath(run.train.pretrained_model)

    def matching() -> bool:
        f = os.path.join(target, ckpt.META)
        if not os.path.isfile(f):
            return False
        try:
            meta = json.loads(open(f).read())
        except (OSError, json.JSONDecodeError):
            return False
        if meta.get("source") != src or meta.get("model_type") != run.train.model_type:
            return False
        if plan.moe is None:
            return True
        # the knobs the converted weights are made of: a conversion for other ones is redone
        fixed = {k: getattr(plan.moe, k) for k in plan.moe.FIXED}
        made = {k: (meta.get("moe") or {}).get(k) for k in plan.moe.FIXED}
        seed_ok = plan.source.moe is not None or meta.get("split_seed") == run.moe.split_seed
        return made == fixed and seed_ok

    if matching():
        say(f"pretrained: using the conversion of {src} in {target}")
        return
    if _rank() == 0:
        args = [
            "hf-to-megamoe",
            "--hf-dir",
            src,
            "--output",
            target,
            "--model-type",
            run.train.model_type,
            "--overwrite",
            "--no-progress",
        ]
        if run.train.model_type == "llama_moe" and plan.source.moe is None:
            args += [
                "--num-experts",
                str(plan.moe.num_experts),
                "--num-selects",
                str(plan.moe.num_selects),
                "--split",
                "random",
                "--split-seed",
                str(run.moe.split_seed),
                "--gate-network-type",
                plan.moe.gate_network,
                "--gate-type",
                plan.moe.gate_type,
            ]
        say(
            f"pretrained: converting {src} -> {target} (megamoe convert {' '.join(args[:1])} "
            f"{' '.join(args[5:])})"
        )
        res = subprocess.run([sys.executable, "-m", "megamoe", "convert", *args], env=_clean_env())
        if res.returncode != 0 or not matching():
            raise TrainingStopped(
                f"converting --pretrained_model {src} failed (exit "
                f"{res.returncode}; see the error above)",
                1,
            )
    else:
        t0 = time.time()
        while not matching():
            if time.time() - t0 > 6 * 3600:
                raise TrainingStopped(f"timed out waiting for rank 0 to convert {src}", 1)
            time.sleep(2.0)


class Trainer:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.run: RunConfig = plan.run
        self._signal: str | None = None
        self.log = RunLogger(self.run.train.output_dir, None, enabled=False)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from .. import parallel
        from ..checkpoint import io as checkpoint
        from ..model import lora
        from ..model.llama import build_model
        from .optim import TrainOptimizer
        from .step import wrap_model

        run, plan = self.run, self.plan
        t, d = run.train, run.data
        self.cuda = torch.cuda.is_available()
        parallel.init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        rank0 = self.rank == 0
        self.log = RunLogger(t.output_dir, None, enabled=rank0)
        if rank0:
            os.makedirs(t.output_dir, exist_ok=True)
            for name in ckpt.remove_stale(t.output_dir):
                self.log.info(f"removed {name} (left by an interrupted save)")
        dist.barrier()
        # the weights: the newest intact checkpoint of this run, else the pretrained model
        self.extra_warnings: list = []
        self.model_cfg, self.moe_cfg = plan.model, plan.moe
        self.resume_from = self._verified_resume()
        meta = ckpt.read_meta(self.resume_from) if self.resume_from else {}
        self.lora_spec = None
        ckpt_lora = meta.get("lora")
        if t.training_mode == "lora":
            self.lora_spec = (
                lora.LoRASpec(**ckpt_lora)
                if ckpt_lora
                else lora.LoRASpec(
                    rank=t.lora_rank,
                    alpha=t.lora_alpha,
                    dropout=t.lora_dropout,
                    targets=list(t.lora_targets),
                    train_gates=t.lora_train_gates and self.moe_cfg is not None,
                    seed=t.seed,
                )
            )
        self.layout = plan.layout
        parallel.initialize(
            self.layout, t.seed, num_experts=self.moe_cfg.num_experts if self.moe_cfg else None
        )
        parallel.set_overlap(
            ep_chunks=run.parallel.ep_overlap_chunks, tp_comm=run.parallel.tp_comm_overlap
        )
        self.dp_rank, self.dp_size = parallel.dp_rank(), parallel.dp_size()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        )
        self.param_dtype = torch.bfloat16 if (t.bf16 and self.cuda) else torch.float32
        self.autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if (t.bf16 and not self.cuda)
            else nullcontext()
        )
        model = build_model(
            self.model_cfg,
            self.moe_cfg,
            self.layout,
            dtype=self.param_dtype,
            recompute=t.gradient_checkpointing,
            attention_backend=t.attention_backend,
        )
        if self.resume_from:
            if self.lora_spec:
                self.lora_info = lora.apply_lora(model, self.lora_spec)
            checkpoint.load_model(self.resume_from, model)
        else:
            checkpoint.load_model(plan.pretrained_checkpoint, model)
            if self.lora_spec:
                self.lora_info = lora.apply_lora(model, self.lora_spec)
        if (
            self.lora_spec
            and t.gradient_checkpointing
            and getattr(model, "embedding", None) is not None
        ):
            # Frozen embeddings give the first recomputed layer an input that does not require
            # grad: megatron-core's (reentrant) recomputation would then cut the adapters off the
            # graph. Mark the embedding output as requiring grad (PEFT's enable_input_require_grads).
            model.embedding.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        self.model = model
        self.ddp = wrap_model(
            model,
            use_distributed_optimizer=plan.use_distributed_optimizer,
            overlap_grad_reduce=run.parallel.overlap_grad_reduce,
            bucket_size=run.parallel.ddp_bucket_size,
            overlap_param_gather=run.parallel.overlap_param_gather
            and plan.use_distributed_optimizer,
        )
        self.opt = TrainOptimizer(
            self.ddp, model, run.optim, t.bf16, plan.use_distributed_optimizer
        )
        # data
        from ..data.sampler import DomainSampler
        from ..data.train_data import MultiDomainTrainData
        from ..data.valid_data import load_validation_sets

        self.domains = list(plan.domains)
        sampler = DomainSampler(
            self.domains,
            plan.domain_weights,
            rule=d.dynamic_data_selection,
            ref_loss=plan.ref_loss,
            seed=t.seed,
            eta=d.dds_eta,
            c=d.dds_c,
        )
        self.data = MultiDomainTrainData(
            d.dataset_dir,
            d.block_size,
            sampler,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            seed=t.seed,
            log=self.log.info,
        )
        self.sampler = sampler
        self.val = (
            load_validation_sets(
                d.validation_dir, d.block_size, d.max_eval_blocks, domains=self.domains
            )
            if d.validation_dir
            else None
        )
        # counters
        self.step = 0
        self.consumed_tokens = 0
        self.consumed_samples = 0
        self.last_eval: dict = {}
        self.last_eval_step = -1
        self.last_save_step = -1
        if self.resume_from:
            self._resume(meta)
        self.max_steps = plan.max_steps
        self.logging_dir = t.logging_dir or default_logging_dir(t.output_dir)
        ld = [self.logging_dir]  # one name on every rank (it holds rank 0's time)
        dist.broadcast_object_list(ld, src=0)
        self.logging_dir = self.log.logging_dir = ld[0]
        from .flops import activated_params, flops_per_token, peak_flops

        self.flops_per_token = flops_per_token(self.model_cfg, self.moe_cfg, d.block_size)
        self.activated = activated_params(self.model_cfg, self.moe_cfg)
        self.peak, self.peak_note = peak_flops(t.peak_tflops)
        self.num_layers = self.model_cfg.num_hidden_layers
        E = self.moe_cfg.num_experts if self.moe_cfg else 0
        self._load_counts = torch.zeros(
            self.num_layers, max(E, 1), dtype=torch.float64, device=self.device
        )

    def _verified_resume(self) -> str | None:
        """The plan's resume checkpoint once every checksum of its manifest matched (spread over
        the ranks); a damaged one is renamed out of the way (rank 0) and the next older one is
        tried, down to the pretrained model. Every rank checks rank 0's choice: their plans were
        made apart, while rank 0 may have been renaming."""
        from ..checkpoint import io as checkpoint_io
        from .plan import intact_checkpoint, read_pretrained, resolve_moe, set_aside, unused_parts

        def agreed(path):
            box = [path]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        plan, path = self.plan, agreed(self.plan.resume_from)
        while path is not None:
            bad = checkpoint_io.verify(path, unused_parts(self.run))
            if not bad:
                break
            if self.rank == 0:
                self.extra_warnings.append(set_aside(path, bad, rename=True).text())
            dist.barrier()
            path = agreed(intact_checkpoint(self.run, [], repair=False))
        if path != plan.resume_from:  # the configs of the weights actually used
            weights, found = read_pretrained(path, "output_dir") if path else (plan.source, [])
            moe, more = resolve_moe(self.run, weights, path or plan.pretrained_checkpoint)
            errs = [f.text() for f in found + more if f.is_error]
            if errs:
                raise TrainingStopped("\n".join(errs), 2)
            self.model_cfg, self.moe_cfg = weights.model, moe
        return path

    def _resume(self, meta: dict) -> None:
        from ..checkpoint import io as checkpoint

        tr = meta.get("trainer") or {}
        if self.run.train.load_optimizer:
            self._check_optimizer_layout(tr)
            from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

            try:
                checkpoint.load_optimizer(self.resume_from, self.model, self.opt)
            except (Exception, CheckpointException) as e:
                if (
                    self.rank == 0
                ):  # the details for a bug report; the message below says what to do
                    print(
                        f"loading the optimizer state failed:\n{traceback.format_exc()}",
                        file=sys.stderr,
                        flush=True,
                    )
                raise TrainingStopped(
                    f"could not load the optimizer state of {self.resume_from} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the "
                    "checkpoint is unchanged. To go on from its weights, data position and "
                    "counters with fresh Adam moments, add --load_optimizer false",
                    2,
                ) from e
        else:
            self.extra_warnings.append(
                f"--load_optimizer false: the optimizer state of "
                f"{self.resume_from} is not loaded (fresh Adam moments)"
            )
        self.data.load_state_dict(tr["data"])
        self.step = int(meta["step"])
        self.consumed_tokens = int(meta["consumed_tokens"])
        self.consumed_samples = int(meta["consumed_samples"])
        self.last_eval = tr.get("last_eval") or {}
        self.last_eval_step = int(tr.get("last_eval_step", -1))
        self.last_save_step = self.step
        self._rng_to_restore = checkpoint.load_rank_state(self.resume_from)
        from .optim import schedule_state

        old = tr.get("schedule") or {}
        new = schedule_state(self.run.optim, self.plan.max_steps)
        changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if changed:
            self.extra_warnings.append(
                "the learning-rate schedule changed since the checkpoint: "
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            )
        if self._rng_to_restore is None:
            self.extra_warnings.append(
                f"no RNG state for rank {self.rank} in {self.resume_from} "
                "(different number of processes?): RNG streams restart"
            )

    def _check_optimizer_layout(self, tr: dict) -> None:
        """Use the checkpoint's distributed-optimizer format; a dp_reshardable one only loads at
        the TP/PP/EP layout it was saved at: say so instead of failing inside megatron-core."""
        # checkpoints saved before the flag: dp_reshardable when distributed
        fmt = tr.get("optimizer_format", "dp_reshardable" if self.opt.distributed else None)
        if (fmt is None) == self.opt.distributed:
            saved = "without" if fmt is None else "with"
            raise TrainingStopped(
                f"{self.resume_from} was saved {saved} the distributed optimizer; resume with "
                f"--use_distributed_optimizer {'false' if fmt is None else 'true'}",
                2,
            )
        if not self.opt.distributed:
            return
        self.opt.checkpoint_format = fmt
        if fmt != "dp_reshardable":
            return
        keys = (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
        )
        saved, now = tr.get("layout") or {}, to_dict(self.run.parallel)
        changed = [
            f"--{k} {saved.get(k)} -> {now.get(k)}"
            for k in keys
            if saved.get(k, 1) != now.get(k, 1)
        ]
        if changed:
            raise TrainingStopped(
                f"{self.resume_from} holds the distributed optimizer in the dp_reshardable format, "
                f"which resumes only at the layout it was saved at ({', '.join(changed)}): resume at "
                "that layout (any data-parallel size works), and save with "
                "--optimizer_checkpoint_format fully_reshardable to change TP/PP/EP later",
                2,
            )

    # ------------------------------------------------------------------ header
    def header(self) -> None:
        run, plan, log = self.run, self.plan, self.log
        log.info(f"max_steps: {self.max_steps}")
        log.info(f"global batch size: {plan.global_batch_size}")
        log.info(f"#tokens/batch: {plan.tokens_per_batch}")
        log.info("config: " + json.dumps(to_dict(run), indent=1, sort_keys=False))
        pc = run.parallel
        log.info(
            f"processes: {self.world} = {plan.num_nodes} node(s) x {plan.gpus_per_node} "
            f"per node; TP {pc.tensor_model_parallel_size} PP "
            f"{pc.pipeline_model_parallel_size} EP {pc.expert_model_parallel_size} DP "
            f"{self.dp_size}; sequence parallel {plan.layout.sequence_parallel}; "
            f"{'CUDA' if self.cuda else 'CPU'}; params {self.param_dtype}; optimizer "
            f"{'distributed (ZeRO-1)' if plan.use_distributed_optimizer else 'megatron-core FP32/Float16'}"
        )
        m, moe = self.model_cfg, self.moe_cfg
        kind = (
            f"LLaMA-MoE {moe.num_experts} experts, top-{moe.num_selects}, SF "
            f"{moe.scale_factor(0):g}, balance loss weight {moe.gate_balance_loss_weight:g}, "
            f"{moe.gate_type}/{moe.gate_network}"
            if moe
            else "LLaMA (dense)"
        )
        log.info(
            f"model: {kind}; {m.num_hidden_layers} layers, hidden {m.hidden_size}, "
            f"vocab {m.vocab_size}; {self.activated:,} activated parameters per token; "
            f"{self.flops_per_token:.3e} FLOPs per token; MFU peak: {self.peak_note}"
        )
        if self.lora_spec:
            i = self.lora_info
            log.info(
                f"LoRA: rank {self.lora_spec.rank}, alpha {self.lora_spec.alpha:g}, dropout "
                f"{self.lora_spec.dropout:g} on {','.join(self.lora_spec.targets)}"
                f"{' + gates' if self.lora_spec.train_gates else ''}: {i['trainable']:,} "
                f"of {i['total']:,} parameters trainable (this rank)"
            )
        log.info(self.data.summary())
        rule = run.data.dynamic_data_selection
        log.info(
            f"domain weights ({plan.prob_map}{', dynamic: ' + rule if rule != 'none' else ''}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in self.sampler.weights_dict().items())
        )
        if self.val is not None:
            log.info(
                "validation: " + ", ".join(f"{k} {len(v)} blocks" for k, v in self.val.items())
            )
        if self.resume_from:
            log.info(
                f"resuming from {self.resume_from}: step {self.step}, "
                f"{self.consumed_tokens:,} tokens consumed"
            )
        else:
            log.info(f"starting from {plan.pretrained_checkpoint}")
        log.info(
            f"checkpoints: {run.train.output_dir}/checkpoint-<step> (every "
            f"{run.train.save_steps or 'end'}); tensorboard: {self.logging_dir}"
        )
        if run.train.comment:
            log.info(f"comment: {run.train.comment}")
        for w in plan.warnings:  # printed by the command line already
            log.file_only(f"warning: {w}")
        for w in self.extra_warnings:
            log.warning(w)
        if self.rank == 0:
            with open(os.path.join(run.train.output_dir, "run_config.json"), "w") as f:
                json.dump(
                    {
                        "config": to_dict(run),
                        "argv": sys.argv[1:],
                        "world": {
                            "num_nodes": plan.num_nodes,
                            "num_gpu_per_node": plan.gpus_per_node,
                            "cuda": self.cuda,
                        },
                    },
                    f,
                    indent=1,
                )

    # ------------------------------------------------------------------ helpers
    def _dp_mean(self, values: list[float]) -> list[float]:
        from .. import parallel

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(t, group=parallel.dp_group())
            t /= self.dp_size
        return t.cpu().tolist()

    def _count_hook(self, target: torch.Tensor, valid_rows: int | None = None, mb: int = 0):
        E = target.shape[1]

        def hook(i, stats):
            for layer, st in stats.items():
                idx = st["topk_idx"]
                if valid_rows is not None and valid_rows < mb:
                    # tokens are [s, b] flattened: keep the real samples' tokens
                    keep = (torch.arange(idx.shape[0], device=idx.device) % mb) < valid_rows
                    idx = idx[keep]
                target[layer] += torch.bincount(idx.reshape(-1), minlength=E).to(target.dtype)

        return hook

    def _check_vocabulary(self, tokens: torch.Tensor, doms: torch.Tensor) -> None:
        """Token ids beyond the vocabulary (data made by another tool, not checked at start-up)
        would fail deep in the embedding: stop with the domain's files named instead. Collective:
        every rank learns of a bad block any rank drew, and all stop together."""
        v = self.model_cfg.vocab_size
        per_sample = tokens.max(dim=1).values
        bad = (per_sample >= v).nonzero()
        found = torch.tensor(
            [float(per_sample.max()), float(doms[bad[0, 0]]) if len(bad) else -1.0],
            dtype=torch.float64,
            device=self.device,
        )
        if self.world > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        top, dom = int(found[0]), int(found[1])
        if top >= v:
            d = self.domains[dom]
            raise TrainingStopped(
                f"a block of domain {d} holds token id {top}, beyond the model's vocab_size {v}: "
                f"its datasets {self.plan.domains.get(d)} were tokenized with another tokenizer; "
                "preprocess them with the pretrained model's own",
                2,
            )

    def _world_sum(self, t: torch.Tensor) -> np.ndarray:
        if self.world > 1:
            dist.all_reduce(t)
        return t.cpu().numpy()

    def _signal_handler(self, signum, frame):
        if self._signal is None:
            self._signal = signal.Signals(signum).name
            if self.rank == 0:
                print(
                    f"received {self._signal}: saving a checkpoint at the end of this step",
                    file=sys.stderr,
                    flush=True,
                )

    def _stop_requested(self) -> str | None:
        every = self.run.train.exit_interval
        if every and self.step % every == 0 and self.step < self.max_steps:
            return f"--exit_interval {every} (step {self.step})"
        flag = torch.tensor([1.0 if self._signal else 0.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (self._signal or "a signal on another rank") if flag.item() > 0 else None

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        from .step import forward_eval

        run = self.run
        ebs = run.data.per_device_eval_batch_size or run.data.per_device_train_batch_size
        self.ddp.eval()
        E = self.moe_cfg.num_experts if self.moe_cfg else 0
        losses, counts = {}, {}
        t0 = time.time()
        for dom, blocks in self.val.items():
            n = blocks.shape[0]
            per_rank = math.ceil(n / (self.dp_size * ebs)) * ebs  # equal on every rank (EP)
            lo = self.dp_rank * per_rank
            idx = torch.arange(lo, lo + per_rank)
            real = idx < n
            mine = blocks[idx % n].to(self.device)
            cnt = torch.zeros(self.num_layers, max(E, 1), dtype=torch.float64, device=self.device)
            mbs = list(mine.split(ebs))
            n_real = [int(r.sum()) for r in real.split(ebs)]
            hooks = [self._count_hook(cnt, nr, ebs) for nr in n_real]
            with self.autocast:
                per_sample = forward_eval(
                    self.ddp, mbs, stats_hook=(lambda i, st: hooks[i](i, st)) if E else None
                )
            tot = torch.tensor(
                [float(per_sample[real].sum()), float(real.sum())],
                dtype=torch.float64,
                device=self.device,
            )
            if self.dp_size > 1:
                from .. import parallel

                dist.all_reduce(tot, group=parallel.dp_group())
            losses[dom] = (tot[0] / tot[1]).item()
            if E:
                counts[dom] = self._world_sum(cnt)
        self.ddp.train()
        return {"losses": losses, "counts": counts, "seconds": time.time() - t0}

    def _after_eval(self, res: dict) -> None:
        log, step = self.log, self.step
        losses = res["losses"]
        rule = self.run.data.dynamic_data_selection
        old = self.sampler.weights_dict()
        if rule != "none":
            self.sampler.update(losses, step=step)
        new = self.sampler.weights_dict()
        mean = float(np.mean(list(losses.values())))
        spec = specialisation(res["counts"]) if res["counts"] else None
        self.last_eval = {
            "step": step,
            "losses": losses,
            "weights": new,
            "specialisation": None if spec is None else spec.tolist(),
        }
        self.last_eval_step = step
        log.info(f"eval step {step}: mean loss {mean:.4f} ({res['seconds']:.1f} s)")
        for dom in self.domains:
            arrow = f" -> {new[dom]:.4f}" if rule != "none" else ""
            log.info(f"  {dom:<16} loss {losses[dom]:.4f}   weight {old[dom]:.4f}{arrow}")
        if spec is not None:
            log.info("  routing specialisation by layer: " + " ".join(f"{x:.3f}" for x in spec))
        log.scalars(step, {f"eval/{k}_loss": v for k, v in losses.items()})
        log.scalar("eval/loss", mean, step)
        log.scalars(step, {f"prob_map/{k}": v for k, v in new.items()})
        if res["counts"]:
            total = sum(res["counts"].values())
            log.heatmap("moe/expert_load_heatmap", total, step)
            for dom, c in res["counts"].items():
                log.heatmap(f"routing/{dom}", c, step)
            for i, x in enumerate(spec):
                log.scalar(f"routing/specialisation/layer_{i}", float(x), step)
            log.scalar("routing/specialisation/mean", float(spec.mean()), step)
        log.record(
            "eval",
            step,
            {"losses": losses, "weights": new, "specialisation": self.last_eval["specialisation"]},
        )
        log.flush()

    # ------------------------------------------------------------------ checkpoints
    def save(self, reason: str = "") -> str:
        from ..checkpoint import io as checkpoint
        from .optim import schedule_state
        from .rng_state import rng_state

        run = self.run
        path = ckpt.checkpoint_path(run.train.output_dir, self.step)
        t0 = time.time()
        extra = rng_state()
        meta = ckpt.make_meta(
            self.model_cfg,
            self.moe_cfg,
            step=self.step,
            consumed_tokens=self.consumed_tokens,
            consumed_samples=self.consumed_samples,
            max_steps=self.max_steps,
            lora=self.lora_spec.to_dict() if self.lora_spec else None,
            trainer={
                "data": self.data.state_dict(),
                "schedule": schedule_state(run.optim, self.max_steps),
                "lr": self.opt.lr,
                "last_eval": self.last_eval,
                "last_eval_step": self.last_eval_step,
                "world_size": self.world,
                "layout": to_dict(run.parallel),
                "optimizer_format": self.opt.checkpoint_format if self.opt.distributed else None,
            },
            pretrained_model=os.path.abspath(run.train.pretrained_model),
            run=to_dict(run),
            comment=run.train.comment,
        )
        self.opt.finish_param_sync()  # an overlapped parameter all-gather: the weights of now
        checkpoint.save(path, self.model, meta, optimizer=self.opt, extra_state=extra)
        self.last_save_step = self.step
        gone = (
            ckpt.rotate(run.train.output_dir, run.train.save_total_limit) if self.rank == 0 else []
        )
        self.log.info(
            f"saved {path} ({time.time() - t0:.1f} s){' ' + reason if reason else ''}"
            + (f"; removed {', '.join(os.path.basename(g) for g in gone)}" if gone else "")
        )
        self.log.record("save", self.step, {"path": path})
        return path

    def last_good_checkpoint(self) -> str | None:
        return ckpt.newest_checkpoint(self.run.train.output_dir)

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        from .optim import lr_at
        from .rng_state import set_rng_state
        from .step import forward_backward

        run, log = self.run, self.log
        t, d = run.train, run.data
        bs, ga = d.per_device_train_batch_size, d.gradient_accumulation_steps
        log.open_tensorboard()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._signal_handler)
        if self.val is not None and t.eval_at_start and self.step == 0:
            self._after_eval(self.evaluate())
        if getattr(self, "_rng_to_restore", None) is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        tokens_per_step = self.plan.tokens_per_batch
        sums = {"loss": 0.0, "lm": 0.0, "bal": 0.0, "gn": 0.0, "n": 0, "time": 0.0}
        recent: list = []
        t_start = time.time()
        E = self.moe_cfg.num_experts if self.moe_cfg else 0
        while self.step < self.max_steps:
            t0 = time.time()
            log_now = (self.step + 1) % t.logging_steps == 0 or self.step + 1 == self.max_steps
            tokens, doms = self.data.next_batch(bs * ga)
            self._check_vocabulary(tokens, doms)
            mbs = list(tokens.to(self.device, non_blocking=True).split(bs))
            self.ddp.zero_grad_buffer()
            self.opt.zero_grad()
            lr = lr_at(self.step, run.optim, self.max_steps)
            self.opt.set_lr(lr)
            hook = self._count_hook(self._load_counts) if (E and log_now) else None
            with self.autocast:
                out = forward_backward(self.ddp, mbs, ga, stats_hook=hook)
            lm, bal = self._dp_mean([out["lm_loss"], out["balance_loss"]])
            loss = lm + bal
            if not math.isfinite(loss):
                raise TrainingStopped(
                    f"non-finite loss at step {self.step + 1}: loss {loss} (lm_loss {lm}, "
                    f"balance_loss {bal}); stopping before the update. Nothing was saved for "
                    f"this step; the last good checkpoint is "
                    f"{self.last_good_checkpoint() or '(none: no checkpoint was saved yet)'}",
                    1,
                )
            ok, gn = self.opt.step()
            if not math.isfinite(gn):
                raise TrainingStopped(
                    f"non-finite gradient norm at step {self.step + 1} ({gn}; loss {loss}); "
                    "stopping before the update. The last good checkpoint is "
                    f"{self.last_good_checkpoint() or '(none: no checkpoint was saved yet)'}",
                    1,
                )
            self.step += 1
            self.consumed_tokens += tokens_per_step
            self.consumed_samples += self.plan.global_batch_size
            if self.cuda:
                torch.cuda.synchronize()
            dt = time.time() - t0
            recent = (recent + [dt])[-20:]
            for k, v in (("loss", loss), ("lm", lm), ("bal", bal), ("gn", gn), ("time", dt)):
                sums[k] += v
            sums["n"] += 1
            if log_now:
                self._log_step(sums, lr, recent, tokens_per_step)
                sums = {k: 0.0 for k in sums}
                sums["n"] = 0
            if t.eval_steps and self.step % t.eval_steps == 0 and self.val is not None:
                self._after_eval(self.evaluate())
            if t.save_steps and self.step % t.save_steps == 0:
                self.save()
            why = self._stop_requested()
            if why:
                if self.last_save_step != self.step:
                    self.save(f"(on {why})")
                log.info(
                    f"received {why}: stopped at step {self.step} of {self.max_steps} after "
                    f"saving {os.path.join(t.output_dir, f'checkpoint-{self.step}')}; run "
                    "the same command to resume"
                )
                log.record("stopped", self.step, {"signal": why})
                log.close()
                return 0
        # the end
        if self.val is not None and self.last_eval_step != self.step:
            self._after_eval(self.evaluate())
        final = (
            self.save("(final)")
            if self.last_save_step != self.step
            else os.path.join(t.output_dir, f"checkpoint-{self.step}")
        )
        log.info(
            f"done: {self.step} steps, {self.consumed_tokens:,} tokens in "
            f"{fmt_duration(time.time() - t_start)}"
        )
        log.record("end", self.step, {"checkpoint": final, "last_eval": self.last_eval})
        log.close()
        self.final_checkpoint = final
        return 0

    def _log_step(self, sums: dict, lr: float, recent: list, tokens_per_step: int) -> None:
        n = max(sums["n"], 1)
        step_time = sums["time"] / n
        tps_gpu = tokens_per_step / max(step_time, 1e-9) / self.world
        mfu = self.flops_per_token * tps_gpu / self.peak
        eta = (self.max_steps - self.step) * (sum(recent) / max(len(recent), 1))
        vals = {
            "loss": sums["loss"] / n,
            "lm_loss": sums["lm"] / n,
            "balance_loss": sums["bal"] / n,
            "lr": lr,
            "grad_norm": sums["gn"] / n,
            "tokens_per_sec_per_gpu": tps_gpu,
            "mfu": mfu,
            "time_per_step": step_time,
            "consumed_tokens": self.consumed_tokens,
        }
        if self.cuda:
            vals["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.log.info(
            f"step {self.step}/{self.max_steps} | loss {vals['loss']:.4f} | lm {vals['lm_loss']:.4f}"
            f" | balance {vals['balance_loss']:.4f} | lr {lr:.3e} | grad norm "
            f"{vals['grad_norm']:.3f} | {tps_gpu:,.0f} tok/s/gpu | MFU {100 * mfu:.2f}% | "
            f"{step_time:.2f} s/step | ETA {fmt_duration(eta)}"
        )
        self.log.scalars(self.step, {f"train/{k}": v for k, v in vals.items()})
        self.log.scalar("train/loss_on_tokens", vals["loss"], self.consumed_tokens)
        if self.moe_cfg is not None:
            counts = self._world_sum(self._load_counts.clone())
            self._load_counts.zero_()
            self.log.expert_histograms(self.step, counts)
        self.log.record("train", self.step, vals)

    def stopped(self, message: str, code: int) -> int:
        """End the run on `message`: on the console and in train.log (opened here when the run
        stopped before its logger, on rank 0) and train_log.jsonl. Returns `code`."""
        if not self.log.enabled and _rank() == 0 and self.run.train.output_dir:
            self.log = RunLogger(self.run.train.output_dir, None, enabled=True)
        self.log.error(message)
        self.log.record("error", getattr(self, "step", 0), {"message": message.splitlines()[-1]})
        self.log.close()
        return code

    # ------------------------------------------------------------------ export
    def export(self) -> str | None:
        """--export_hf: the final checkpoint (LoRA merged) -> <output_dir>/hf."""
        run = self.run
        out = os.path.join(run.train.output_dir, "hf")
        if self.world == 1:
            from ..convert import megamoe_to_hf

            megamoe_to_hf(
                self.final_checkpoint,
                out,
                tokenizer=run.train.tokenizer_model,
                overwrite=True,
                progress=False,
            )
        else:  # the converter is a world of one: a process of its own
            dist.barrier()
            if self.rank == 0:
                args = [
                    sys.executable,
                    "-m",
                    "megamoe",
                    "convert",
                    "megamoe-to-hf",
                    "--checkpoint",
                    self.final_checkpoint,
                    "--output",
                    out,
                    "--overwrite",
                    "--no-progress",
                ]
                if run.train.tokenizer_model:
                    args += ["--tokenizer", run.train.tokenizer_model]
                subprocess.run(args, env=_clean_env(), check=True)
            dist.barrier()
        if self.rank == 0:
            print(
                f"exported {self.final_checkpoint} -> {out} (Hugging Face "
                f"{'LLaMA-MoE' if self.moe_cfg else 'LLaMA'}{', LoRA merged' if self.lora_spec else ''})",
                flush=True,
            )
        return out


def run_training(plan: Plan) -> int:
    """Set up and train per `plan` (plan.make_plan). Returns the exit code."""
    from torch.distributed.checkpoint.api import CheckpointException

    def say(msg):
        if _rank() == 0:
            print(msg, flush=True)

    trainer = Trainer(plan)
    try:
        ensure_converted(plan, say)
        trainer.setup()
        trainer.header()
        code = trainer.train()
        if code == 0 and plan.run.train.export_hf and getattr(trainer, "final_checkpoint", None):
            trainer.export()
        return code
    except TrainingStopped as e:
        return trainer.stopped(str(e), e.code)
    except KeyboardInterrupt:
        return trainer.stopped(
            f"interrupted (Ctrl-C) at step {getattr(trainer, 'step', 0)}; the newest checkpoint "
            f"is {ckpt.newest_checkpoint(plan.run.train.output_dir) or '(none yet)'}: run the same "
            "command to resume from it",
            INTERRUPTED,
        )
    except (Exception, CheckpointException):  # a bug, or a failed write (a full disk): the
        # whole traceback, in train.log too (CheckpointException, dist_checkpointing's, is a
        # BaseException)
        return trainer.stopped(traceback.format_exc().rstrip(), 1)
