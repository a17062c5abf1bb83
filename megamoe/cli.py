"""The `megamoe` command: one verb per job.

    megamoe train FLAGS...            the trainer (python -m megamoe.train FLAGS, under torchrun too)
    megamoe launch FLAGS...           sbatch -> srun -> torchrun (what scripts/launch.sh runs)
    megamoe check SCRIPT_OR_CONFIG    the training guide's checklist as a pre-flight report
    megamoe estimate ...              max_steps, global batch size, #tokens/batch, wall time
    megamoe convert hf-to-megamoe|megamoe-to-hf ...   (tools/convert_hf_checkpoint.py)
    megamoe preprocess ...            jsonl -> Megatron .bin/.idx (tools/preprocess_data.py)
    megamoe split-domains ...         SlimPajama jsonl -> one folder per domain (tools/split_domains.py)
    megamoe demo                      the whole pipeline on a tiny built-in corpus

`megamoe VERB --help` shows a verb's flags; every long flag takes both its `-` and `_` spelling.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# verb -> (module whose main(argv, prog) runs it, one line of help)
VERBS = {
    "train": ("megamoe.train.main", "continual pre-training of LLaMA / LLaMA-MoE"),
    "launch": ("megamoe.ops.launcher", "sbatch -> srun -> torchrun (scripts/launch.sh)"),
    "check": ("megamoe.ops.checklist", "the guide's checklist for an sbatch script or a config"),
    "estimate": ("megamoe.ops.estimate", "max_steps, global batch size, tokens and wall time"),
    "convert": ("megamoe.convert", "Hugging Face LLaMA / LLaMA-MoE <-> megamoe checkpoints"),
    "preprocess": ("megamoe.data.preprocess", "tokenize jsonl into Megatron .bin/.idx datasets"),
    "split-domains": ("megamoe.data.split_domains", "split SlimPajama jsonl into domain folders"),
    "demo": ("megamoe.demo", "the whole pipeline on a tiny built-in corpus (CPU, minutes)"),
}


STARTS_PROCESSES = ("train", "launch", "convert", "preprocess", "demo")


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {v:<{width}}  {h}" for v, (_, h) in VERBS.items()]
    return (
        "usage: megamoe VERB [FLAGS...]\n\n"
        + "\n".join(lines)
        + "\n\n`megamoe VERB --help` for a verb's flags."
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"megamoe: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if verb in STARTS_PROCESSES:
        from .lifetime import watch_over_me

        watch_over_me()  # this process runs the job: its children end with it, even on SIGKILL
    module = importlib.import_module(VERBS[verb][0])
    try:
        return module.main(rest, prog=f"megamoe {verb}")
    except SystemExit as e:  # argparse (--help, bad flags), or sys.exit("a message")
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return 0 if e.code is None else e.code


if __name__ == "__main__":
    sys.exit(main())
