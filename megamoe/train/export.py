"""Export a training checkpoint to Hugging Face format, merging LoRA adapters first.

    python -m megamoe.train.export --checkpoint outputs/run/checkpoint-1000 --output hf/run \
        [--tokenizer tokenizer.model] [--merged-checkpoint DIR]

A plain checkpoint goes straight to the converter (megamoe.convert.megamoe_to_hf). A LoRA
checkpoint (its megamoe.json names the adapters) is loaded with its adapters, merged
(W += alpha/r * B A, megamoe.model.lora.merge_lora) and saved as an ordinary megamoe checkpoint
(`--merged-checkpoint`, default <output>.merged-megamoe, removed afterwards unless given), which
the converter then exports. Runs in one process (a world of one), like the converter.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence


def merge_checkpoint(checkpoint_dir: str, output: str) -> str:
    """Load a LoRA checkpoint, merge its adapters and save a plain megamoe checkpoint."""
    from .. import checkpoint
    from ..convert import _world1
    from ..model import lora
    from ..model.llama import build_model

    meta = checkpoint.read_meta(checkpoint_dir)
    m, moe = checkpoint.configs_from_meta(meta)
    _world1(0)
    model = build_model(m, moe)
    spec = meta.get("lora")
    if spec:
        lora.apply_lora(model, lora.LoRASpec(**spec))
    checkpoint.load_model(checkpoint_dir, model)
    lora.merge_lora(model)
    keep = {k: v for k, v in meta.items() if k not in ("lora", "trainer")}
    keep["merged_from"] = str(Path(checkpoint_dir).resolve())
    checkpoint.save(output, model, keep)
    return output


def export_hf(checkpoint_dir: str, output: str, tokenizer: Optional[str] = None,
              merged_checkpoint: Optional[str] = None, overwrite: bool = True,
              dtype: str = "float32") -> str:
    from .. import checkpoint
    from ..convert import megamoe_to_hf

    meta = checkpoint.read_meta(checkpoint_dir)
    src, tmp = checkpoint_dir, None
    if meta.get("lora"):
        tmp = merged_checkpoint or f"{output.rstrip('/')}.merged-megamoe"
        src = merge_checkpoint(checkpoint_dir, tmp)
    try:
        megamoe_to_hf(src, output, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype,
                      progress=False)
    finally:
        if tmp is not None and merged_checkpoint is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megamoe.train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", help="tokenizer file or directory to copy into the export")
    p.add_argument("--merged-checkpoint", help="keep the merged megamoe checkpoint here (LoRA)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    from ..checkpoint import CheckpointError

    try:
        out = export_hf(a.checkpoint, a.output, a.tokenizer, a.merged_checkpoint, dtype=a.dtype)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # guard: dist_checkpointing's save spawns a process
    sys.exit(main())
