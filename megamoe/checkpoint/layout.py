"""What a megamoe checkpoint is on disk, and a run's directory of them (torch-free).

    <dir>/megamoe.json        what the checkpoint holds: model_type, model and MoE config, and
                              whatever the writer adds (step, consumed tokens, sampler state, ...)
    <dir>/model/              megatron-core dist_checkpointing of the model's sharded state dict
    <dir>/optimizer/          (training checkpoints) the optimizer state, likewise
    <dir>/rank_state_*.pt     (training checkpoints) per-rank RNG state
    <dir>/manifest.json       every other file's size and CRC-32, written last (verify())

    <output_dir>/checkpoint-<step>/         one checkpoint of a run
    <output_dir>/checkpoint-<step>.tmp-*    being written (or left by a crash mid-save)
    <output_dir>/.checkpoint-<step>.old-*   a replaced copy, removed once its successor is in

A checkpoint is written under a temporary name and renamed when complete, so a directory under
its final name with megamoe.json is complete; its manifest tells whether it is still intact (a
truncated or corrupted file: verify() names it). A checkpoint that fails is renamed
`<name>.corrupt-<time>` (quarantine()), never deleted, and a run resumes from the newest one that
verifies. Everything here reads files and names them; it moves or deletes only directories a
run's checkpointing wrote (quarantine, remove_stale, rotate); megatron-core I/O is in io.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ModelConfig, MoEConfig, from_dict, to_dict

META = "megamoe.json"
FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# leftovers of an interrupted save: its temporary, or a replaced copy moved aside (publish_dir)
STALE_RE = re.compile(r"^(checkpoint-\d+\.tmp-.+|\.checkpoint-\d+\.old-\d+)$")


MANIFEST = "manifest.json"
CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A directory that is not a readable megamoe checkpoint; the message names the file."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a megamoe checkpoint (no {META}); convert a Hugging "
            "Face model with tools/convert_hf_checkpoint.py hf-to-megamoe"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{meta_file}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_file}: format_version {found} is not {FORMAT_VERSION}")
    return meta


def configs_from_meta(meta: dict) -> tuple[ModelConfig, MoEConfig | None]:
    model = from_dict(ModelConfig, meta["model"])
    moe = from_dict(MoEConfig, meta["moe"]) if meta.get("moe") else None
    return model, moe


def make_meta(model: ModelConfig, moe: MoEConfig | None, **extra: Any) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model_type": "llama_moe" if moe else "llama",
        "model": to_dict(model),
        "moe": to_dict(moe) if moe else None,
        **extra,
    }


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def list_checkpoints(output_dir: str | None) -> list[tuple[int, str]]:
    """Complete checkpoints of a run (their metadata file written last) as sorted (step, path)."""
    out = []
    if output_dir and os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = CKPT_RE.match(name)
            path = os.path.join(output_dir, name)
            if m and os.path.isfile(os.path.join(path, META)):
                out.append((int(m.group(1)), path))
    return sorted(out)


def newest_checkpoint(output_dir: str | None) -> str | None:
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


def remove_stale(output_dir: str) -> list[str]:
    """Delete temporaries of interrupted saves (rank 0, before any save). Returns what went."""
    gone = []
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            if STALE_RE.match(name):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                gone.append(name)
    return gone


def rotate(output_dir: str, limit: int | None) -> list[str]:
    """Keep the newest `limit` complete checkpoints; returns the removed paths."""
    if not limit:
        return []
    gone = []
    for _, path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


# ------------------------------------------------------------------------------------------------
# The manifest: sizes and checksums, written with every checkpoint and verified before a resume


def files_of(directory: str | os.PathLike) -> list[str]:
    """Every file of a checkpoint (relative, sorted) but its manifest."""
    root = Path(directory)
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def crc32(path: str | os.PathLike) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def my_share(names: Sequence[str], rank: int, world: int) -> list[str]:
    """The files that rank `rank` of `world` checksums (every world-th, so the work spreads)."""
    return list(names[rank::world])


def write_manifest(directory: str | os.PathLike, crcs: dict[str, str]) -> None:
    """Record every file's size and CRC-32 (`crcs`: relative name -> checksum, gathered from the
    ranks that computed them) as `directory`/manifest.json."""
    root = Path(directory)
    files = {n: {"size": (root / n).stat().st_size, "crc32": c} for n, c in sorted(crcs.items())}
    (root / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify(
    directory: str | os.PathLike,
    share: tuple[int, int] | None = (0, 1),
    skip: tuple[str, ...] = (),
) -> list[str]:
    """What is wrong with a checkpoint (one line per file, naming it), [] when it is intact:
    its metadata must parse, and each file of the manifest exist with its size; the checksums
    of this rank's `share` (rank, world) of the files are compared too (share None: sizes only).
    Files under the folders in `skip` (e.g. "optimizer/", when it will not be loaded) are not
    looked at. A checkpoint written before manifests existed is checked for its metadata only."""
    root = Path(directory)
    try:
        read_meta(root)
    except CheckpointError as e:
        return [str(e)]
    if not (root / MANIFEST).is_file():  # a checkpoint of an older megamoe, unless it just went
        return [] if (root / META).is_file() else [f"{root}: disappeared while being verified"]
    try:
        files = json.loads((root / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{root / MANIFEST}: not a readable manifest ({e})"]
    files = {n: v for n, v in files.items() if not n.startswith(skip)}
    bad = []
    for name, want in files.items():
        f = root / name
        if not f.is_file():
            bad.append(f"{f}: missing")
        elif f.stat().st_size != want["size"]:
            bad.append(
                f"{f}: {f.stat().st_size} bytes, the manifest says {want['size']} "
                "(truncated or replaced)"
            )
    if share is not None and not bad:
        for name in my_share(sorted(files), *share):
            if crc32(root / name) != files[name]["crc32"]:
                bad.append(f"{root / name}: checksum differs from the manifest (corrupted)")
    return bad


def quarantine(directory: str | os.PathLike) -> str:
    """Rename a checkpoint that failed verify() out of the run's way (kept for inspection: it is
    never deleted, and neither resume nor rotation looks at it again)."""
    path = Path(directory)
    new = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(new)
    return str(new)
