"""Split raw SlimPajama-style jsonl into one folder per domain (the logic of tools/split_domains.py).

Each record's domain is read from a dotted key (default `meta.redpajama_set_name`) and mapped to
the LLaMA-MoE domain names. Lines are copied byte for byte (no re-serialisation). Every input file
becomes `<out>/<domain>/<path>.jsonl[.gz]`, <path> being its path relative to the inputs' common
folder with '/' as '_', so SlimPajama's chunk1/example_train_0 and chunk2/example_train_0 do not
collide (a counter separates any names that still would). Files are written in a temporary folder
inside `<out>` and moved into place only when the whole input succeeded; a file already there is
never replaced, except with --overwrite in a folder a former split made.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

from ..command import FlagParser, run_command
from ..outputs import mark, remove_leftovers, staging_dir, written_by_megamoe
from .jsonl import EXTENSIONS, input_files, iter_lines

DEFAULT_MAPPING = {
    "RedPajamaCommonCrawl": "en_cc",
    "RedPajamaC4": "en_c4",
    "RedPajamaGithub": "github",
    "RedPajamaWikipedia": "en_wikipedia",
    "RedPajamaBook": "en_book",
    "RedPajamaArXiv": "en_arxiv",
    "RedPajamaStackExchange": "en_stack",
}


class SplitError(ValueError):
    pass


def folder_name(domain, where: str) -> str:
    """A domain becomes a folder of --output-dir: a plain name, nothing that leads elsewhere."""
    if (
        not isinstance(domain, str)
        or domain in ("", ".", "..")
        or domain.startswith(".")
        or "/" in domain
        or os.sep in domain
        or "\0" in domain
    ):
        raise SplitError(
            f"{where}: domain {domain!r} cannot be a folder name of --output-dir "
            "(empty, hidden, or a path)"
        )
    return domain


def get_dotted(rec, key: str):
    for part in key.split("."):
        if not isinstance(rec, dict) or part not in rec:
            return None
        rec = rec[part]
    return rec


def _strip_ext(name: str) -> str:
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def out_names(files: list[str], compress: bool) -> list[str]:
    """One distinct output file name per input file: its path relative to the inputs' common
    folder, '/' -> '_' (SlimPajama repeats example_train_0.jsonl in every chunk folder), with a
    counter where two names would still meet."""
    real = [os.path.realpath(f) for f in files]
    common = os.path.commonpath([os.path.dirname(r) for r in real])
    ext = ".jsonl.gz" if compress else ".jsonl"
    names, seen = [], collections.Counter()
    for r in real:
        stem = _strip_ext(os.path.relpath(r, common)).replace(os.sep, "_")
        seen[stem] += 1
        names.append(stem + (f"-{seen[stem]}" if seen[stem] > 1 else "") + ext)
    return names


def split_domains(
    inputs,
    output_dir: str,
    key: str = "meta.redpajama_set_name",
    mapping: dict | None = None,
    unknown: str = "error",
    skip_bad_lines: bool = False,
    compress: bool = False,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Returns {domain: number of records}; see the module docstring."""
    mapping = dict(DEFAULT_MAPPING if mapping is None else mapping)
    for value, domain in mapping.items():
        folder_name(domain, f"the mapping of {value!r}")
    files = input_files([inputs] if isinstance(inputs, str) else list(inputs))
    names = out_names(files, compress)
    out = Path(output_dir)
    remove_leftovers(out / "split")  # a killed run's temporary folder, before looking
    ours = not out.is_dir() or not any(out.iterdir())  # a new or empty folder: megamoe's
    tmp = staging_dir(out / "split", "megamoe split-domains")
    counts = collections.Counter()
    written: dict[str, int] = {}  # output path -> bytes, checked once everything is in place
    bad = 0
    try:
        for path, name in zip(files, names):
            outs = {}
            try:
                for lineno, line in iter_lines(path):
                    if not line.strip():
                        continue
                    try:
                        value = get_dotted(json.loads(line), key)
                        if not isinstance(value, str):
                            raise ValueError(f"no string at key {key!r}")
                    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
                        if not skip_bad_lines:
                            raise SplitError(
                                f"{path}:{lineno}: {e} (use --skip-bad-lines to skip such lines)"
                            ) from None
                        bad += 1
                        continue
                    domain = mapping.get(value)
                    if domain is None:
                        if unknown == "error":
                            raise SplitError(
                                f"{path}:{lineno}: {key} = {value!r} is not in the "
                                f"mapping {sorted(mapping)} (see --mapping, "
                                "--unknown)"
                            )
                        if unknown == "skip":
                            counts[f"(skipped) {value}"] += 1
                            continue
                        domain = folder_name(value, f"{path}:{lineno}: {key}")  # "keep"
                    if domain not in outs:
                        os.makedirs(os.path.join(tmp, domain), exist_ok=True)
                        p = os.path.join(tmp, domain, name)
                        outs[domain] = gzip.open(p, "wb") if compress else open(p, "wb")
                    outs[domain].write(line if line.endswith(b"\n") else line + b"\n")
                    counts[domain] += 1
            finally:
                for f in outs.values():
                    f.close()
        made = [
            (d, f)
            for d in sorted(os.listdir(tmp))
            if (tmp / d).is_dir()
            for f in sorted(os.listdir(tmp / d))
        ]
        taken = [str(out / d / f) for d, f in made if (out / d / f).exists()]
        if taken and not (overwrite and written_by_megamoe(out)):
            raise SplitError(
                f"--output-dir {output_dir} already holds {taken[0]}"
                + (f" and {len(taken) - 1} more file(s)" if len(taken) > 1 else "")
                + ", which this split would replace: "
                + (
                    "pass --overwrite to replace files of a former split there, or "
                    if written_by_megamoe(out)
                    else "megamoe did not write it; "
                )
                + "choose another --output-dir (several inputs that share file names "
                "belong in one run: each gets its own output file)"
            )
        for d, f in made:
            os.makedirs(out / d, exist_ok=True)
            written[str(out / d / f)] = os.path.getsize(tmp / d / f)
            os.replace(tmp / d / f, out / d / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ours:
        mark(out, "megamoe split-domains")
    lost = [p for p, n in written.items() if not os.path.isfile(p) or os.path.getsize(p) != n]
    if lost:
        raise SplitError(
            f"{lost[0]} is not on disk as written (another process changed the "
            "output folder?); the counts above would not match"
        )
    result = dict(counts)
    if bad:
        result["(bad lines)"] = bad
    return result


def build_parser(prog: str = "split_domains.py") -> argparse.ArgumentParser:
    p = FlagParser(
        prog=prog, description="Split SlimPajama-style jsonl into one folder per domain."
    )
    p.add_argument("--input", required=True, nargs="+", help="jsonl file(s), folder(s) or glob(s)")
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--key",
        default="meta.redpajama_set_name",
        help="dotted path of the domain field in each record",
    )
    p.add_argument(
        "--mapping",
        help="json file {raw value: domain folder}, replacing the default SlimPajama mapping",
    )
    p.add_argument(
        "--unknown",
        choices=["error", "skip", "keep"],
        default="error",
        help="records whose value is not in the mapping: fail, drop, or keep them "
        "in a folder named after the value",
    )
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--compress", action="store_true", help="write .jsonl.gz")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files a former split wrote into --output-dir",
    )
    return p


PROG = "split_domains.py"


def main(argv=None, prog: str = PROG) -> int:
    """The command line: 0 on success; 2 with one clear error line on bad input."""
    return run_command(prog, run, argv)


def run(argv, prog: str = PROG) -> int:
    """The command, raising on bad input."""
    a = build_parser(prog).parse_args(argv)
    mapping = None
    if a.mapping:
        with open(a.mapping) as f:
            mapping = json.load(f)
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise SplitError(f"{a.mapping} must hold a json object {{value: domain}}")
    counts = split_domains(
        a.input, a.output_dir, a.key, mapping, a.unknown, a.skip_bad_lines, a.compress, a.overwrite
    )
    expected = sorted(set((mapping or DEFAULT_MAPPING).values()))
    for d in sorted(set(counts) | set(expected)):
        print(f"{d:<24} {counts.get(d, 0):>12,} records")
    empty = [d for d in expected if not counts.get(d)]
    if empty:
        print(f"warning: no records for {empty}", file=sys.stderr)
    return 0
