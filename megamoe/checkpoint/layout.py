"""What a megamoe checkpoint is on disk, and a run's directory of them (torch-free).

    <dir>/megamoe.json        what the checkpoint holds: model_type, model and MoE config, and
                              whatever the writer adds (step, consumed tokens, sampler state, ...)
    <dir>/model/              megatron-core dist_checkpointing of the model's sharded state dict
    <dir>/optimizer/          (training checkpoints) the optimizer state, likewise
    <dir>/rank_state_*.pt     (training checkpoints) per-rank RNG state

    <output_dir>/checkpoint-<step>/         one checkpoint of a run
    <output_dir>/checkpoint-<step>.tmp-*    being written (or left by a crash mid-save)
    <output_dir>/.checkpoint-<step>.old-*   a replaced copy, removed once its successor is in

A checkpoint is written under a temporary name and renamed when complete (megamoe.json last), so
a directory under its final name with megamoe.json is complete. Everything here only reads
files, names them or moves directories this code wrote; megatron-core I/O is in io.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from ..config import ModelConfig, MoEConfig, from_dict, to_dict

META = "megamoe.json"
FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# leftovers of an interrupted save: its temporary, or a replaced copy moved aside (publish_dir)
STALE_RE = re.compile(r"^(checkpoint-\d+\.tmp-.+|\.checkpoint-\d+\.old-\d+)$")


class CheckpointError(ValueError):
    """A directory that is not a readable megamoe checkpoint; the message names the file."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a megamoe checkpoint (no {META}); convert a Hugging "
                              "Face model with tools/convert_hf_checkpoint.py hf-to-megamoe")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{meta_file}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_file}: format_version {found} is not {FORMAT_VERSION}")
    return meta


def configs_from_meta(meta: dict) -> tuple[ModelConfig, Optional[MoEConfig]]:
    model = from_dict(ModelConfig, meta["model"])
    moe = from_dict(MoEConfig, meta["moe"]) if meta.get("moe") else None
    return model, moe


def make_meta(model: ModelConfig, moe: Optional[MoEConfig], **extra: Any) -> dict:
    return {"format_version": FORMAT_VERSION, "model_type": "llama_moe" if moe else "llama",
            "model": to_dict(model), "moe": to_dict(moe) if moe else None, **extra}


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def list_checkpoints(output_dir: Optional[str]) -> list[tuple[int, str]]:
    """Complete checkpoints of a run (their metadata file written last) as sorted (step, path)."""
    out = []
    if output_dir and os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = CKPT_RE.match(name)
            path = os.path.join(output_dir, name)
            if m and os.path.isfile(os.path.join(path, META)):
                out.append((int(m.group(1)), path))
    return sorted(out)


def newest_checkpoint(output_dir: Optional[str]) -> Optional[str]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def training_finished(output_dir: str) -> bool:
    """Whether the run in output_dir reached its end: its newest checkpoint's step >= max_steps."""
    newest = newest_checkpoint(output_dir)
    if newest is None:
        return False
    try:
        meta = read_meta(newest)
        return int(meta.get("step", -1)) >= int(meta.get("max_steps", 1 << 62))
    except (CheckpointError, ValueError, TypeError):
        return False


def temporary_name(path: Path) -> Path:
    """Where checkpoint `path` is written before it is complete (one name per job, so that a
    requeued job finds and removes its predecessor's leftovers)."""
    return path.with_name(f"{path.name}.tmp-{os.environ.get('SLURM_JOB_ID', os.getpid())}")


def publish_dir(staging: Path, output: Path) -> None:
    """Move the finished `staging` directory to `output`. An existing output is moved aside and
    removed only once the new one is in place, so a crash never loses the last good copy."""
    old = None
    if output.exists():
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()
        else:
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old)


def remove_stale(output_dir: str) -> list[str]:
    """Delete temporaries of interrupted saves (rank 0, before any save). Returns what went."""
    gone = []
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            if STALE_RE.match(name):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                gone.append(name)
    return gone


def rotate(output_dir: str, limit: Optional[int]) -> list[str]:
    """Keep the newest `limit` complete checkpoints; returns the removed paths."""
    if not limit:
        return []
    gone = []
    for _, path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone
