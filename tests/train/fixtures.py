"""Tiny runs for the trainer tests: a pretrained checkpoint, multi-domain data, a command line.

Everything is real: the data are Megatron indexed datasets written by our writer, the checkpoint
is a megamoe checkpoint of a random tiny model (hidden 64, 2 layers), and runs go through
`python -m megamoe.train` in subprocesses (or `megamoe.train.main.main` in-process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 128
SEQ = 32
DOMAINS = ["code", "prose", "noise"]


def write_domains(root: str, n_docs: int = 40, seed: int = 0, domains=DOMAINS) -> str:
    """One folder per domain; documents of different difficulty (a repeated pattern, a Markov
    chain, uniform noise)."""
    from megamoe.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(VOCAB, 0.05), size=VOCAB)
    for k, dom in enumerate(domains):
        w = IndexedDatasetWriter(os.path.join(root, dom, f"{dom}_text_document"), np.uint16)
        for _ in range(n_docs):
            n = int(rng.integers(20, 80))
            if k % 3 == 0:
                pat = rng.integers(3, VOCAB, size=int(rng.integers(3, 7)))
                doc = np.resize(pat, n)
            elif k % 3 == 1:
                doc = [int(rng.integers(3, VOCAB))]
                for _ in range(n - 1):
                    doc.append(int(rng.choice(VOCAB, p=trans[doc[-1]])))
            else:
                doc = rng.integers(3, VOCAB, size=n)
            w.add_document(np.concatenate([[1], doc]).astype(np.int64))
        w.finalize()
    return root


def tiny_configs(moe: bool = True):
    from megamoe.config import ModelConfig, MoEConfig

    m = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    e = MoEConfig(num_experts=4, num_selects=2) if moe else None
    return m, e


def save_pretrained(path: str, moe: bool = True, seed: int = 0) -> str:
    """A random tiny model saved as a megamoe checkpoint, in a world-of-one subprocess."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from tests.train.fixtures import _save_pretrained_main\n"
        f"_save_pretrained_main({path!r}, {moe!r}, {seed!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=clean_env(), cwd=ROOT)
    return path


def _save_pretrained_main(path, moe, seed):
    from megamoe import checkpoint, parallel
    from megamoe.model.llama import build_model

    m, e = tiny_configs(moe)
    parallel.initialize(parallel.ParallelLayout(), seed=seed)
    checkpoint.save(path, build_model(m, e), checkpoint.make_meta(m, e))


def world1(seed: int = 0) -> None:
    """This process as a world of one with megatron-core's groups (for in-process checks)."""
    import torch.distributed as dist

    from megamoe import parallel

    if not dist.is_initialized():
        from tests.conftest import free_port

        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
        )
    parallel.initialize(parallel.ParallelLayout(), seed=seed)


def save_pretrained_inprocess(path: str, moe: bool = True, seed: int = 0) -> str:
    from megamoe import checkpoint, parallel
    from megamoe.model.llama import build_model

    m, e = tiny_configs(moe)
    world1(seed)
    checkpoint.save(path, build_model(m, e), checkpoint.make_meta(m, e))
    parallel.destroy()
    return path


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        )
    }
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_argv(pretrained: str, data: str, valid: str, out: str, **flags) -> list:
    base = dict(
        model_type="llama_moe",
        pretrained_model=pretrained,
        dataset_dir=data,
        validation_dir=valid,
        output_dir=out,
        block_size=SEQ,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=3e-3,
        warmup_steps=2,
        final_lr_portion=0.1,
        logging_steps=1,
        eval_steps=3,
        save_steps=3,
        seed=5,
        max_eval_blocks=4,
    )
    base.update(flags)
    argv = []
    for k, v in base.items():
        if v is None:
            continue
        argv += [f"--{k}", str(v)]
    return argv


def run_train(argv: list, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megamoe.train", *argv],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def log_records(out: str, kind: str) -> dict:
    """Per step, the last train_log.jsonl record of `kind` (a resumed run logs redone steps again)."""
    recs = {}
    for line in open(os.path.join(out, "train_log.jsonl")):
        r = json.loads(line)
        if r["kind"] == kind:
            recs[r["step"]] = r
    return recs


def train_losses(out: str) -> list:
    """The training loss of every step, in step order."""
    recs = log_records(out, "train")
    return [recs[s]["loss"] for s in sorted(recs)]


def torchrun_train(tiny, out, tp=1, pp=1, ep=1, procs=1, micro=1, global_batch=4, **flags):
    """The trainer under torchrun in `procs` CPU processes (gloo) at this layout, on `tiny`'s MoE
    checkpoint and data, gate noise off, no evaluation; the global batch is the same at every
    layout (gradient accumulation = global_batch / (micro x DP)), so are the losses."""
    dp = procs // (tp * pp)
    opts = dict(
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=global_batch // (micro * dp),
        learning_rate=3e-3,
        warmup_steps=2,
        eval_steps=0,
        save_steps=0,
        gate_add_noise="false",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel="true" if tp > 1 else "false",
    )
    opts.update(flags)
    argv = train_argv(tiny.moe, tiny.data, None, out, **opts)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        "-m",
        "megamoe.train",
        *argv,
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (
        f"tp={tp} pp={pp} ep={ep} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    )
