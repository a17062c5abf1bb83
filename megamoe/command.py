"""What every megamoe command shares: its flag parser and how it ends on a user's error.

Users come from the LLaMA-MoE guide (``--num_selects``) and from Megatron-LM
(``--tensor-model-parallel-size``): each command accepts both ``-`` and ``_`` spellings of every
long flag, and its help shows one. argparse's prefix matching is off: ``--learn 5e-3`` must not
silently mean ``--learning_rate``.

A user's error (bad input, a missing file: ValueError and OSError and their kinds) ends a
command with one line naming what to fix and exit code 2 (as argparse, the trainer and the
launcher do for bad flags), and Ctrl-C with one line and 130; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _other_spellings(option: str) -> list[str]:
    body = option[2:]
    return [f"--{body.replace('-', '_')}", f"--{body.replace('_', '-')}"]


class FlagParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _spell(self, argv: Sequence[str]) -> list[str]:
        known = set(self._option_string_actions)
        out = []
        for token in argv:
            if token == "--":  # everything after is positional
                out.extend(argv[len(out) :])
                break
            if token.startswith("--") and len(token) > 2:
                name, eq, value = token.partition("=")
                if name not in known:
                    for other in _other_spellings(name):
                        if other in known:
                            token = other + eq + value
                            break
            out.append(token)
        return out

    def error(self, message: str):
        """One line, not the whole usage: the flag lists are long."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._spell(args), namespace)


USER_ERROR, INTERRUPTED = 2, 130


def run_command(
    prog: str, func: Callable[[Sequence[str], str], int], argv: Sequence[str] | None = None
) -> int:
    """func(argv, prog) (argv: the command line's by default), with a user's error or Ctrl-C as
    one line on stderr instead of a traceback."""
    try:
        return func(list(sys.argv[1:] if argv is None else argv), prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USER_ERROR
