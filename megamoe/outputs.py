"""Directories megamoe writes as a whole, and the rules that keep a user's files safe.

A tool writes such a directory under a temporary name beside it, marks it (MARK, a small JSON
file saying which command wrote it), and renames it into place when it is complete. Replacing an
existing directory (``--overwrite``) is allowed only when

- it is empty, or it carries MARK (megamoe wrote it: a user's own directory never does), and
- it neither is, contains, nor lies inside any input of the command (an output that is or
  contains an input is refused even when it does not exist yet: writing it would replace the input),

and the old copy is moved aside and deleted only once the new one is in place. Temporaries left
by a killed run are recognised by name and by a process id that no longer runs, and removed by
the next run on the same machine. Nothing here deletes anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

MARK = ".megamoe-output"


class OutputError(ValueError):
    """An output that must not be written or replaced; the message says why and what to do."""


def mark(directory: Path, command: str) -> None:
    """Record in `directory` (being written) that `command` wrote it."""
    (directory / MARK).write_text(json.dumps({"written_by": command, "time": time.time()}) + "\n")


def written_by(directory: Path) -> str | None:
    """The command that wrote `directory` (its MARK), None for a directory megamoe did not."""
    try:
        return json.loads((directory / MARK).read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None


def written_by_megamoe(directory: Path) -> bool:
    return written_by(directory) is not None


def _within(a: Path, b: Path) -> bool:
    """a is b or lies inside b (resolved paths, links followed)."""
    return a == b or b in a.parents


def check_output(
    output: Path,
    inputs: Iterable[tuple[str, os.PathLike | None]],
    overwrite: bool,
    flag: str = "--output",
) -> None:
    """Refuse an output that would lose a user's files (see the module docstring); `inputs` are
    (flag, path) of what the command reads."""
    out = output.resolve()
    replacing = output.is_dir() and any(output.iterdir())
    for in_flag, path in inputs:
        if path is None:
            continue
        src = Path(path).resolve()
        if _within(src, out) or (replacing and _within(out, src)):
            where = "is" if out == src else "contains" if _within(src, out) else "lies inside"
            raise OutputError(
                f"{flag} {output} {where} {in_flag} {path}: refusing, it would "
                "replace what the command reads; choose an --output outside it"
            )
    if output.exists() and not output.is_dir():
        raise OutputError(f"{flag} {output} exists and is not a directory")
    if replacing:
        if not overwrite:
            raise OutputError(
                f"{flag} {output} already holds files; pass --overwrite to replace "
                "an output megamoe wrote, or choose another directory"
            )
        if not written_by_megamoe(output):
            raise OutputError(
                f"{flag} {output} holds files that megamoe did not write (no {MARK} "
                "in it): --overwrite replaces only megamoe's own outputs; choose "
                "another directory, or move that one away yourself"
            )


def staging_dir(output: Path, command: str) -> Path:
    """A fresh, marked temporary directory beside `output`, for this process, once what killed
    runs of this machine left there is removed."""
    remove_leftovers(output)
    tmp = output.with_name(f".{output.name}.{STAGING}-{socket.gethostname()}-{os.getpid()}")
    tmp.mkdir(parents=True)
    mark(tmp, command)
    return tmp


STAGING = "staging"
_LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.{STAGING}-(?P<host>.+)-(?P<pid>\d+)$")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(output: Path) -> list[str]:
    """Remove staging directories of `output` left by killed runs: named as staging_dir names
    them, marked, made on this machine (a process id means nothing on another node of a shared
    filesystem) by a process that no longer runs."""
    gone = []
    parent = output.parent
    if not parent.is_dir():
        return gone
    host = socket.gethostname()
    for entry in parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if (
            m
            and m.group("name") == output.name
            and m.group("host") == host
            and int(m.group("pid")) != os.getpid()
            and not process_alive(int(m.group("pid")))
            and entry.is_dir()
            and written_by_megamoe(entry)
        ):
            shutil.rmtree(entry, ignore_errors=True)
            gone.append(entry.name)
    return gone


def publish_dir(staging: Path, output: Path) -> None:
    """Move the finished `staging` directory to `output`. An existing output (checked with
    check_output) is moved aside and removed only once the new one is in place, so a crash never
    loses the last good copy."""
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
