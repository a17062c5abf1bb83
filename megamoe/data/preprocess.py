"""Tokenize jsonl into Megatron indexed datasets (the logic of tools/preprocess_data.py).

Output: `<output-prefix>_<key>_document.{bin,idx}` per json key (byte-compatible with Megatron-LM's
tools/preprocess_data.py for the same flags), one sequence per document: the text's tokens, with
BOS in front when `--tokenizer-type Llama2Tokenizer --legacy-tokenizer` asks for it (Megatron-LM
core 0.15/0.16's legacy path; without it, as current Megatron-LM, no BOS), and EOS behind with
`--append-eod`; a text with no tokens becomes a document boundary without a sequence. Beside each
dataset, `<prefix>.stats.json` records its largest token id, counts and how it was made.

How it scales without growing memory: the main process reads lines in batches and hands them
to a pool of workers (json parsing and sentencepiece run there); at most a few batches per worker
are in flight, and results are written in submission order, so the output is identical for any
number of workers. Outputs are written under temporary names and renamed only when the whole
input succeeded.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from ..command import FlagParser, run_command
from .indexed import IndexedDatasetWriter, optimal_dtype
from .jsonl import EXTENSIONS, input_files, iter_lines


class PreprocessError(ValueError):
    pass


def load_tokenizer(path: str):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise PreprocessError(f"tokenizer model not found: {path}")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise PreprocessError(f"{path} is not a sentencepiece model ({e})") from None


def choose_dtype(vocab_size: int, requested: str = "auto"):
    if requested == "auto":
        return optimal_dtype(vocab_size)
    dtype = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise PreprocessError(
            f"a vocabulary of {vocab_size} tokens does not fit {requested}; "
            "use --dtype int32 (or auto)"
        )
    return dtype.type


# ---- worker side: one tokenizer per process, set up by the pool initializer ----
_W: dict = {}


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _init_worker(model: str, keys: list[str], bos: bool, eod: bool) -> None:
    if mp.parent_process() is not None:  # a worker process (--workers 1 runs this inline)
        from ..lifetime import die_with_parent

        die_with_parent(mp.parent_process().pid)  # never outlives the run, even on SIGKILL
    sp = load_tokenizer(model)
    _W.update(sp=sp, keys=keys, bos=sp.bos_id() if bos else -1, eos=sp.eos_id() if eod else -1)


def _encode_batch(batch):
    """(path, [(lineno, raw line)]) -> (n_docs, {key: (tokens int32, lengths)}, errors, bytes).

    A line with an error contributes to no key, so the keys' datasets stay aligned."""
    path, lines = batch
    keys, texts, errors, nbytes = _W["keys"], {k: [] for k in _W["keys"]}, [], 0
    for lineno, raw in lines:
        nbytes += len(raw)
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) are not documents
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            errors.append((path, lineno, f"malformed json ({e})"))
            continue
        if not isinstance(rec, dict):
            errors.append((path, lineno, "not a json object"))
            continue
        bad = [k for k in keys if not isinstance(rec.get(k), str)]
        if bad:
            what = "missing key" if bad[0] not in rec else "non-string value for key"
            errors.append((path, lineno, f"{what} {bad[0]!r} (--json-keys {' '.join(keys)})"))
            continue
        unencodable = [k for k in keys if not _utf8(rec[k])]
        if unencodable:
            errors.append(
                (
                    path,
                    lineno,
                    f"key {unencodable[0]!r} holds text that is not valid "
                    "Unicode (a lone surrogate such as \\ud800)",
                )
            )
            continue
        for k in keys:
            texts[k].append(rec[k])
    out = {}
    head = [_W["bos"]] if _W["bos"] >= 0 else []
    tail = [_W["eos"]] if _W["eos"] >= 0 else []
    for k in keys:
        # num_threads=1: one core per worker, so --workers alone decides the parallelism
        ids = _W["sp"].encode(texts[k], num_threads=1) if texts[k] else []
        # as Megatron-LM: BOS belongs to the text's tokens; a text with no tokens is a document
        # boundary without a sequence, and gets no EOD either
        docs = [head + t + tail if head or t else [] for t in ids]
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        tok = np.fromiter(itertools.chain.from_iterable(docs), np.int32, int(lengths.sum()))
        out[k] = (tok, lengths)
    return len(texts[keys[0]]), out, errors, nbytes


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Inline:
    """The executor interface, run in this process (--workers 1): no copies, no process start."""

    def __init__(self, *initargs):
        _init_worker(*initargs)

    def submit(self, fn, *args):
        return _Done(fn(*args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _batches(files, batch_lines: int):
    for path in files:
        buf = []
        for lineno, line in iter_lines(path):
            buf.append((lineno, line))
            if len(buf) >= batch_lines:
                yield path, buf
                buf = []
        if buf:
            yield path, buf


class _Progress:
    """tqdm on a terminal; a plain line every `interval` documents otherwise (Slurm logs)."""

    def __init__(self, interval: int, enabled: bool, desc: str):
        self.t0, self.docs, self.tokens = time.time(), 0, 0
        self.interval = self.next_log = interval
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="doc", unit_scale=True, desc=desc, file=sys.stderr)
        self.enabled = enabled

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(time.time() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        elif self.enabled and self.docs >= self.next_log:
            self.next_log += self.interval
            el = time.time() - self.t0
            print(
                f"processed {self.docs:,} documents ({self.docs / el:,.0f} docs/s, "
                f"{rate:,.0f} tokens/s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess(
    inputs,
    output_prefix: str,
    tokenizer_model: str,
    json_keys=("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    add_bos: bool = False,
    dtype: str = "auto",
    batch_lines: int = 256,
    progress: bool = True,
    log_interval: int = 100_000,
) -> dict:
    """Tokenize `inputs` into `<output_prefix>_<key>_document.{bin,idx}`; returns statistics."""
    keys = list(json_keys)
    if workers < 1:
        raise PreprocessError(f"--workers {workers} must be at least 1")
    if batch_lines < 1:
        raise PreprocessError(f"--batch-lines {batch_lines} must be at least 1")
    files = input_files(inputs)
    sp = load_tokenizer(tokenizer_model)
    vocab = sp.get_piece_size()
    if append_eod and sp.eos_id() < 0:
        raise PreprocessError(f"{tokenizer_model} defines no EOS token; drop --append-eod")
    add_bos = add_bos and sp.bos_id() >= 0
    out_dtype = choose_dtype(vocab, dtype)
    initargs = (tokenizer_model, keys, add_bos, append_eod)
    info = {
        "tokenizer_model": os.path.abspath(tokenizer_model),
        "vocab_size": vocab,
        "bos": add_bos,
        "eod": append_eod,
        "json_key": None,
    }
    writers = {
        k: IndexedDatasetWriter(
            f"{output_prefix}_{k}_document", out_dtype, info=dict(info, json_key=k)
        )
        for k in keys
    }
    stats = collections.Counter()
    bar = _Progress(log_interval, progress, os.path.basename(output_prefix))
    t0 = time.time()
    try:
        # spawn: workers start clean (no forked torch/OpenMP threads); ProcessPoolExecutor
        # raises BrokenProcessPool when a worker dies, where multiprocessing.Pool would hang.
        pool_cm = (
            _Inline(*initargs)
            if workers <= 1
            else ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, initargs)
        )
        with pool_cm as pool:  # on an error, leaving the block stops the workers
            pending = collections.deque()
            max_pending = 1 if workers <= 1 else 4 * workers  # bounded memory

            def drain_one():
                try:
                    n, enc, errs, nbytes = pending.popleft().result()
                except BrokenProcessPool:
                    raise PreprocessError(
                        "a tokenizer worker process died (out of memory? or, when calling "
                        "preprocess() from your own script, it needs an "
                        "`if __name__ == '__main__':` guard so spawned workers can import it)"
                    ) from None
                if errs:
                    stats["bad_lines"] += len(errs)
                    if not skip_bad_lines:
                        p, line, msg = errs[0]
                        raise PreprocessError(
                            f"{p}:{line}: {msg} (use --skip-bad-lines to skip such lines)"
                        )
                    for p, line, msg in errs:  # name the first few, count the rest
                        if stats["reported"] < 5:
                            stats["reported"] += 1
                            print(f"skipping {p}:{line}: {msg}", file=sys.stderr)
                for k in keys:
                    writers[k].add_documents(*enc[k])
                stats["documents"] += n
                stats["bytes"] += nbytes
                ntok = len(enc[keys[0]][0])
                stats["tokens"] += ntok
                bar.update(n, ntok)

            for batch in _batches(files, batch_lines):
                pending.append(pool.submit(_encode_batch, batch))
                while len(pending) >= max_pending:
                    drain_one()
            while pending:
                drain_one()
        if stats["documents"] == 0:
            raise PreprocessError(f"no documents found in {files}")
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    stats.pop("reported", None)
    return dict(
        stats,
        seconds=time.time() - t0,
        vocab_size=vocab,
        dtype=np.dtype(out_dtype).name,
        files=len(files),
    )


def _domain_jobs(input_dir: str, output_dir: str):
    """--domain-folders: sub-folders `<d>/` and files `<d>.jsonl*` of input_dir are domains;
    each is written to `<output_dir>/<d>/<d>` (+ `_<key>_document`)."""
    jobs = []
    for name in sorted(os.listdir(input_dir)):
        path = os.path.join(input_dir, name)
        if name.startswith("."):
            continue
        if os.path.isdir(path):
            domain = name
        elif name.endswith(EXTENSIONS):
            domain = name.split(".")[0]
        else:
            continue
        jobs.append((domain, path, os.path.join(output_dir, domain, domain)))
    if not jobs:
        raise PreprocessError(f"{input_dir} has no domain sub-folders or <domain>.jsonl files")
    return jobs


def build_parser(prog: str = "preprocess_data.py") -> argparse.ArgumentParser:
    p = FlagParser(
        prog=prog, description="Tokenize jsonl into Megatron indexed datasets (.bin/.idx)."
    )
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="jsonl file(s), folder(s) (searched recursively) or glob(s); "
        ".jsonl, .jsonl.gz, .jsonl.zst (with zstandard installed)",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys to extract, each to its own dataset (LLaMA-MoE data: content)",
    )
    g.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip malformed lines and lines missing a key (counted) instead of failing",
    )
    g.add_argument(
        "--domain-folders",
        action="store_true",
        help="--input is a folder whose sub-folders (or <domain>.jsonl files) are "
        "domains; --output-prefix is an output folder that receives "
        "<domain>/<domain>_<key>_document.{bin,idx} for each",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer-type",
        default="Llama2Tokenizer",
        choices=["Llama2Tokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer"],
        help="all read a sentencepiece model (the choice matters with --legacy-tokenizer)",
    )
    g.add_argument(
        "--legacy-tokenizer",
        action="store_true",
        help="with Llama2Tokenizer: BOS before every document, LLaMA's convention "
        "(Megatron-LM core 0.15/0.16's --legacy-tokenizer; without it, as current "
        "Megatron-LM, no BOS)",
    )
    g.add_argument("--tokenizer-model", required=True, help="sentencepiece model (tokenizer.model)")
    g.add_argument("--append-eod", action="store_true", help="append EOS to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "uint16", "int32"],
        help="token dtype; auto = uint16 for vocabularies under 65500, else int32",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--batch-lines", type=int, default=256, help="lines per task sent to a worker")
    g.add_argument(
        "--log-interval",
        type=int,
        default=100_000,
        help="documents between progress lines when stderr is not a terminal",
    )
    g.add_argument("--no-progress", action="store_true")
    return p


PROG = "preprocess_data.py"


def main(argv=None, prog: str = PROG) -> int:
    """The command line: 0 on success; 2 with one clear error line on bad input."""
    return run_command(prog, run, argv)


def run(argv, prog: str = PROG) -> int:
    """The command, raising on bad input."""
    a = build_parser(prog).parse_args(argv)
    common = dict(
        tokenizer_model=a.tokenizer_model,
        json_keys=a.json_keys,
        append_eod=a.append_eod,
        workers=a.workers,
        skip_bad_lines=a.skip_bad_lines,
        add_bos=a.legacy_tokenizer and a.tokenizer_type == "Llama2Tokenizer",
        dtype=a.dtype,
        batch_lines=a.batch_lines,
        progress=not a.no_progress,
        log_interval=a.log_interval,
    )
    if a.domain_folders:
        if len(a.input) != 1 or not os.path.isdir(a.input[0]):
            raise PreprocessError("--domain-folders takes one input folder")
        jobs = _domain_jobs(a.input[0], a.output_prefix)
    else:
        jobs = [(None, a.input, a.output_prefix)]
    for domain, inp, prefix in jobs:
        s = preprocess(inp, prefix, **common)
        rate = s["tokens"] / max(s["seconds"], 1e-9)
        print(
            f"{'[' + domain + '] ' if domain else ''}{s['documents']:,} documents, "
            f"{s['tokens']:,} tokens ({s['dtype']}) from {s['files']} file(s) in "
            f"{s['seconds']:.1f} s: {s['documents'] / max(s['seconds'], 1e-9):,.0f} docs/s, "
            f"{rate:,.0f} tokens/s; {'BOS' if common['add_bos'] else 'no BOS'}, "
            f"{'EOS' if a.append_eod else 'no EOS'} per document"
            + (f"; skipped {s['bad_lines']} bad line(s)" if s.get("bad_lines") else "")
            + f" -> {prefix}_{{{','.join(a.json_keys)}}}_document.bin/.idx"
        )
    return 0
