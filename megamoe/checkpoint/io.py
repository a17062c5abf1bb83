"""Writing and reading megamoe checkpoints with megatron-core's dist_checkpointing (the layout
on disk: layout.py). A checkpoint is written into a temporary directory and renamed when complete,
so a crash mid-save never leaves a half-written directory under the final name; an existing
directory is only replaced (moved aside, then deleted) once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..outputs import publish_dir
from ..parallel.mcore import dist_checkpointing
from .layout import (
    META,
    CheckpointError,
    crc32,
    files_of,
    my_share,
    read_meta,
    temporary_name,
    write_manifest,
)
from .layout import verify as layout_verify


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(
    path: str | os.PathLike,
    model: torch.nn.Module,
    meta: dict,
    optimizer: Any = None,
    extra_state: dict | None = None,
) -> Path:
    """Collective: every rank calls it. Writes `path` atomically (see module docstring).
    The temporary name is agreed on rank 0 and broadcast."""
    path = Path(path)
    tmp = [str(temporary_name(path))]
    if dist.is_initialized():
        dist.broadcast_object_list(tmp, src=0)
    tmp = Path(tmp[0])
    if _rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "model").mkdir(parents=True)
        if optimizer is not None:
            (tmp / "optimizer").mkdir()
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
    if optimizer is not None:
        dist_checkpointing.save(
            optimizer.sharded_state_dict(model.sharded_state_dict()), str(tmp / "optimizer")
        )
    if extra_state is not None:  # per-rank state (RNG): one small file each
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(extra_state, tmp / f"rank_state_{rank:05d}.pt")
    if _rank0():
        (tmp / META).write_text(json.dumps(meta, indent=2))
    _barrier()
    _write_manifest(tmp)
    if _rank0():
        publish_dir(tmp, path)
    _barrier()
    return path


def _write_manifest(tmp: Path) -> None:
    """Collective: each rank checksums its share of the files; rank 0 writes the manifest."""
    names = [files_of(tmp) if _rank0() else None]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1:
        dist.broadcast_object_list(names, src=0)
    mine = {n: crc32(tmp / n) for n in my_share(names[0], rank, world)}
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    if rank == 0:
        write_manifest(tmp, {k: v for part in parts for k, v in part.items()})


def verify(path: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[str]:
    """Collective: layout.verify with the checksums spread over the ranks; every rank gets every
    problem found."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    bad = layout_verify(path, (rank, world), skip)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, bad)
        bad = sorted({b for part in parts for b in part})
    return bad


def load_model(path: str | os.PathLike, model: torch.nn.Module) -> dict:
    """Collective: load the model weights of checkpoint `path` into this rank's part of `model`
    (any TP/PP/EP layout). Returns the checkpoint's metadata."""
    meta = read_meta(path)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(Path(path) / "model"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}): was it written for another model type?"
        )
    return meta


def load_optimizer(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any) -> None:
    state = dist_checkpointing.load(
        optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True),
        str(Path(path) / "optimizer"),
    )
    optimizer.load_state_dict(state)


def load_rank_state(path: str | os.PathLike) -> dict | None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    f = Path(path) / f"rank_state_{rank:05d}.pt"
    return torch.load(f, weights_only=False) if f.exists() else None


def gather_full_state(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Collective: the model's full (unsharded) tensors, keyed by checkpoint key, on every rank.

    Uses the model's own sharded state dict (the checkpoint's sharding metadata), so it works for
    any TP/PP/EP layout. With `grads=True` it gathers the gradients (megatron-core DDP's
    main_grad, else .grad) instead of the weights. Meant for tests and small models.
    """
    from ..parallel.mcore import ShardedTensor, apply_factories

    params = [p for p in model.parameters()]
    saved = []
    if grads:
        for p in params:
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            saved.append(p.data)
            p.data = (g if g is not None else torch.zeros_like(p)).detach().to(p.dtype).view_as(p)
    try:
        sd = model.sharded_state_dict()
        apply_factories(sd)
        pieces = []
        flat = [x for v in sd.values() for x in (v if isinstance(v, list) else [v])]
        for v in flat:
            if isinstance(v, ShardedTensor) and not any(
                v.replica_id if isinstance(v.replica_id, tuple) else (v.replica_id,)
            ):
                pieces.append(
                    (
                        v.key,
                        tuple(v.global_shape),
                        tuple(v.global_offset),
                        tuple(v.local_shape),
                        v.data.detach().cpu().clone(),
                    )
                )
    finally:
        for p, d in zip(params, saved):
            p.data = d
    everything = [pieces]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everything = [None] * dist.get_world_size()
        dist.all_gather_object(everything, pieces)
    full: dict[str, torch.Tensor] = {}
    for rank_pieces in everything:
        for key, gshape, goff, lshape, data in rank_pieces:
            t = full.setdefault(key, torch.zeros(gshape, dtype=data.dtype))
            lshape = (1,) * (len(gshape) - len(lshape)) + lshape  # prepended (layer) axes
            if data.numel() != t[tuple(slice(o, o + n) for o, n in zip(goff, lshape))].numel():
                raise RuntimeError(
                    f"{key}: shard {tuple(data.shape)} vs {lshape} at {goff} of {gshape}"
                )
            t[tuple(slice(o, o + n) for o, n in zip(goff, lshape))] = data.reshape(lshape)
    return full
