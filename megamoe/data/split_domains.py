"""Split raw SlimPajama-style jsonl into one folder per domain (the logic of tools/split_domains.py).

Each record's domain is read from a dotted key (default `meta.redpajama_set_name`) and mapped to
the LLaMA-MoE domain names. Lines are copied byte for byte (no re-serialisation). Every input file
`<rel/path/name>.jsonl[.gz|.zst]` becomes `<out>/<domain>/<rel_path_name>.jsonl[.gz]`, so
SlimPajama's chunk1/example_train_0 and chunk2/example_train_0 do not collide. Files are written
in a temporary folder inside `<out>` and moved into place only when the whole input succeeded.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import sys

from ..command import FlagParser, run_command
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


def get_dotted(rec, key: str):
    for part in key.split("."):
        if not isinstance(rec, dict) or part not in rec:
            return None
        rec = rec[part]
    return rec


def _out_name(path: str, roots: list[str], compress: bool) -> str:
    rel = os.path.basename(path)
    for r in roots:  # inputs given as folders keep their relative path in the name
        if os.path.isdir(r) and os.path.abspath(path).startswith(os.path.abspath(r) + os.sep):
            rel = os.path.relpath(path, r)
            break
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if rel.endswith(ext):
            rel = rel[: -len(ext)]
            break
    return rel.replace(os.sep, "_") + (".jsonl.gz" if compress else ".jsonl")


def split_domains(inputs, output_dir: str, key: str = "meta.redpajama_set_name",
                  mapping: dict | None = None, unknown: str = "error",
                  skip_bad_lines: bool = False, compress: bool = False, log=print) -> dict:
    """Returns {domain: number of records}; see the module docstring."""
    mapping = dict(DEFAULT_MAPPING if mapping is None else mapping)
    roots = [inputs] if isinstance(inputs, str) else list(inputs)
    files = input_files(roots)
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f".split-tmp-{os.getpid()}")
    counts = collections.Counter()
    bad = 0
    try:
        for path in files:
            name = _out_name(path, roots, compress)
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
                            raise SplitError(f"{path}:{lineno}: {e} (use --skip-bad-lines to "
                                             "skip such lines)") from None
                        bad += 1
                        continue
                    domain = mapping.get(value)
                    if domain is None:
                        if unknown == "error":
                            raise SplitError(f"{path}:{lineno}: {key} = {value!r} is not in the "
                                             f"mapping {sorted(mapping)} (see --mapping, "
                                             "--unknown)")
                        if unknown == "skip":
                            counts[f"(skipped) {value}"] += 1
                            continue
                        domain = value  # "keep": a folder named after the raw value
                    if domain not in outs:
                        os.makedirs(os.path.join(tmp, domain), exist_ok=True)
                        p = os.path.join(tmp, domain, name)
                        outs[domain] = gzip.open(p, "wb") if compress else open(p, "wb")
                    outs[domain].write(line if line.endswith(b"\n") else line + b"\n")
                    counts[domain] += 1
            finally:
                for f in outs.values():
                    f.close()
        for domain in sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []:
            os.makedirs(os.path.join(output_dir, domain), exist_ok=True)
            for f in sorted(os.listdir(os.path.join(tmp, domain))):
                os.replace(os.path.join(tmp, domain, f), os.path.join(output_dir, domain, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = dict(counts)
    if bad:
        result["(bad lines)"] = bad
    return result


def build_parser(prog: str = "split_domains.py") -> argparse.ArgumentParser:
    p = FlagParser(
        prog=prog,
        description="Split SlimPajama-style jsonl into one folder per domain.")
    p.add_argument("--input", required=True, nargs="+", help="jsonl file(s), folder(s) or glob(s)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--key", default="meta.redpajama_set_name",
                   help="dotted path of the domain field in each record")
    p.add_argument("--mapping", help="json file {raw value: domain folder}, replacing the "
                   "default SlimPajama mapping")
    p.add_argument("--unknown", choices=["error", "skip", "keep"], default="error",
                   help="records whose value is not in the mapping: fail, drop, or keep them "
                        "in a folder named after the value")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--compress", action="store_true", help="write .jsonl.gz")
    return p


PROG = "split_domains.py"


def main(argv=None, prog: str = PROG) -> int:
    """The command line: 0 on success; 2 with one clear error line on bad input."""
    return run_command(prog, lambda args: run(args, prog), sys.argv[1:] if argv is None else argv)


def run(argv, prog: str = PROG) -> int:
    """The command, raising on bad input."""
    a = build_parser(prog).parse_args(argv)
    mapping = None
    if a.mapping:
        with open(a.mapping) as f:
            mapping = json.load(f)
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise SplitError(f"{a.mapping} must hold a json object {{value: domain}}")
    counts = split_domains(a.input, a.output_dir, a.key, mapping, a.unknown, a.skip_bad_lines,
                           a.compress)
    expected = sorted(set((mapping or DEFAULT_MAPPING).values()))
    for d in sorted(set(counts) | set(expected)):
        print(f"{d:<24} {counts.get(d, 0):>12,} records")
    empty = [d for d in expected if not counts.get(d)]
    if empty:
        print(f"warning: no records for {empty}", file=sys.stderr)
    return 0
