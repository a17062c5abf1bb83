"""Start-up at SlimPajama scale: time from process start to the trainer's first step, and memory.

    python benchmarks/startup.py                          # 10M, 150M, 590M documents; blocks 64, 4096
    python benchmarks/startup.py --docs 10M --block-sizes 64 --warm 1     # a quick look

For each document count a simulated SlimPajama-627B is built under a temporary folder: the seven
domain folders, tokens in SlimPajama's proportions (627B x documents / 590M in all), each domain one
real Megatron .idx (lengths, pointers, document indices: 20 bytes per document, ~12 GB at 590M)
and a sparse .bin of uint16 tokens (truncated to size: zeros, no disk used). Then per block size:

  trainer  `python -m megamoe.train` on a tiny llama_moe checkpoint made here (one CPU process,
           micro-batch 1, seed --trainer-seed): seconds from process start until step 1 is
           logged, and the process's RSS high-water mark (VmHWM) then. Cold: the page cache is
           dropped first (needs root; said so when not possible); warm: median of --warm runs;
           resume: from a checkpoint saved after step 1, until step 2 is logged. For scale:
           the duration of step 1 itself (as logged) and of a process that only imports what
           the trainer imports (torch, megatron-core, megamoe); and the CPU time (user + system)
           of the trainer until step 1 and of the imports, less sensitive to other load.
  data     MultiDomainTrainData alone, as data-parallel rank 0 and rank 7 of 8, for each of
           --seeds: milliseconds to build it and draw the first global batch of 64, then to
           resume from its state and draw the next; and how much that raised the process's RSS
           high-water mark (the sampling memory; VmHWM is reset after the imports).

Everything made here is removed at the end, also after errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megamoe.data.indexed import CODE_OF, MAGIC  # noqa: E402

TOTAL_TOKENS, TOTAL_DOCS = 627 * 10**9, 590 * 10**6
# domain: (share of tokens, share of documents). Token shares are SlimPajama's; document shares
# are a rough guess (long books and papers, short C4 pages). Start-up reads O(1) entries of each
# index, so only the totals matter.
DOMAINS = {
    "en_cc": (0.522, 0.40),
    "en_c4": (0.267, 0.45),
    "github": (0.052, 0.035),
    "en_book": (0.042, 0.0004),
    "en_arxiv": (0.046, 0.0026),
    "en_wikipedia": (0.038, 0.045),
    "en_stack": (0.033, 0.0666),
}
DTYPE = np.dtype(np.uint16)


def parse_count(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", s.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {s!r} (e.g. 10M, 590M, 1.5G)")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2).upper()])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--docs",
        type=lambda s: [parse_count(x) for x in s.split(",")],
        default=[10**7, 15 * 10**7, 59 * 10**7],
        help="document counts (10M,150M,590M)",
    )
    ap.add_argument(
        "--block-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[64, 4096]
    )
    ap.add_argument("--warm", type=int, default=3, help="warm trainer runs per case (median)")
    ap.add_argument(
        "--trainer-seed",
        type=int,
        default=23,
        help="23: the seed whose first draw is the CommonCrawl-sized domain",
    )
    ap.add_argument(
        "--seeds",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[23, 1227],
        help="seeds of the data-only measurement",
    )
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary folder goes")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.warm < 1:
        ap.error(f"--warm must be >= 1, got {args.warm}")
    return args


# ------------------------------------------------------------------------------ the dataset


def write_domain(prefix: str, n_docs: int, n_tokens: int, rng, chunk: int = 1 << 23) -> None:
    """A real .idx of n_docs one-sequence documents with n_tokens in all (exponential lengths),
    written in vectorised chunks at their offsets, and a sparse .bin of that many tokens."""
    head = MAGIC + struct.pack("<QBQQ", 1, CODE_OF[DTYPE], n_docs, n_docs + 1)
    off_len, off_ptr = len(head), len(head) + 4 * n_docs
    off_doc = off_ptr + 8 * n_docs
    fd = os.open(prefix + ".idx", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, head, 0)
        docs = toks = 0
        while docs < n_docs:
            c = min(chunk, n_docs - docs)
            target = n_tokens * (docs + c) // n_docs - toks  # cumulative rounding: exact total
            w = rng.standard_exponential(c)
            lens = 1 + np.floor(w * ((target - c) / w.sum())).astype(np.int64)
            lens[: target - int(lens.sum())] += 1  # the remainder (< c) one token each
            if lens.max() >= 2**31:
                raise ValueError(f"{prefix}: a document of {lens.max()} tokens (int32 lengths)")
            os.pwrite(fd, lens.astype(np.int32), off_len + 4 * docs)
            os.pwrite(fd, (toks + np.cumsum(lens) - lens) * DTYPE.itemsize, off_ptr + 8 * docs)
            os.pwrite(fd, np.arange(docs, docs + c, dtype=np.int64), off_doc + 8 * docs)
            docs, toks = docs + c, toks + target
        os.pwrite(fd, np.array([n_docs], np.int64), off_doc + 8 * n_docs)
    finally:
        os.close(fd)
    with open(prefix + ".bin", "wb") as f:
        f.truncate(n_tokens * DTYPE.itemsize)


def build_dataset(root: str, n_docs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    info = {}
    for d, (tok_share, doc_share) in DOMAINS.items():
        docs = max(1, round(n_docs * doc_share))
        toks = round(TOTAL_TOKENS * n_docs / TOTAL_DOCS * tok_share)
        os.makedirs(os.path.join(root, d))
        write_domain(os.path.join(root, d, f"{d}_content_document"), docs, toks, rng)
        info[d] = (docs, toks)
    return info


# ------------------------------------------------------------------------------ processes


def vm_hwm(pid="self") -> float:
    """RSS high-water mark of a process in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def cpu_seconds(pid) -> float:
    """User + system CPU time of a running process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def env() -> dict:
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def make_checkpoint(path: str) -> None:
    """A random tiny llama_moe (hidden 64, 2 layers, 4 experts top-2, LLaMA's vocabulary)."""
    code = f"""
from megamoe import checkpoint, parallel
from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.llama import build_model
m = ModelConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
e = MoEConfig(num_experts=4, num_selects=2)
parallel.initialize(parallel.ParallelLayout(), seed=0)
checkpoint.save({path!r}, build_model(m, e), checkpoint.make_meta(m, e))
"""
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL
    )


IMPORTS = "import torch, megamoe.checkpoint, megamoe.train.trainer"


def time_imports() -> tuple[float, float]:
    """(wall, CPU) seconds of a process that only imports what the trainer imports."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True, env=env(), cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return time.perf_counter() - t0, cpu


def run_trainer(ckpt, data, out, block, seed, max_steps, stop_at=None, timeout=900) -> dict:
    """Seconds from process start until step `stop_at` is logged and VmHWM then; the process is
    killed there (stop_at None: it runs to the end, e.g. to leave a checkpoint)."""
    argv = [
        "--model_type",
        "llama_moe",
        "--pretrained_model",
        ckpt,
        "--dataset_dir",
        data,
        "--output_dir",
        out,
        "--block_size",
        str(block),
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        str(max_steps),
        "--logging_steps",
        "1",
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--warmup_steps",
        "0",
        "--seed",
        str(seed),
    ]
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "megamoe.train", *argv],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pattern = re.compile(rf"\bstep {stop_at}/{max_steps}\b") if stop_at else None
    res, tail = {}, []
    try:
        for line in p.stdout:
            tail = (tail + [line])[-30:]
            if pattern and pattern.search(line):
                res = {
                    "seconds": time.perf_counter() - t0,
                    "hwm": vm_hwm(p.pid),
                    "cpu_s": cpu_seconds(p.pid),
                }
                m = re.search(r"([\d.]+) s/step", line)
                res["step_s"] = float(m.group(1)) if m else float("nan")
                break
            if time.perf_counter() - t0 > timeout:
                break
        if not pattern:
            p.wait(timeout=timeout)  # to its end (it saves a checkpoint)
    finally:  # also on Ctrl-C / SIGTERM: no trainer is left running
        if p.poll() is None:
            p.kill()
        p.wait()
    if (pattern and not res) or (not pattern and p.returncode != 0):
        raise RuntimeError(f"the trainer failed (exit {p.returncode}):\n{''.join(tail)}")
    return res


DATA_CODE = """
import json, sys, time
from megamoe.data.domains import load_prob_map
from megamoe.data.sampler import DomainSampler
from megamoe.data.train_data import MultiDomainTrainData

def hwm():
    peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    return int(peak.split()[1]) * 1024

data_dir, block, seed, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
domains = sorted(DOMAIN_NAMES)
def build():
    s = DomainSampler(domains, load_prob_map("sheared_llama", domains), seed=seed)
    return MultiDomainTrainData(data_dir, block, s, dp_rank=rank, dp_size=8, seed=seed,
                                log=lambda m: None)
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
base = hwm()
t0 = time.perf_counter()
d = build()
d.next_batch(8)
t1 = time.perf_counter()
state = json.loads(json.dumps(d.state_dict()))
r = build()
r.load_state_dict(state)
r.next_batch(8)
t2 = time.perf_counter()
print(json.dumps({"start_ms": 1e3 * (t1 - t0), "resume_ms": 1e3 * (t2 - t1),
                  "extra": hwm() - base, "reset": reset, "state": state["position"]}))
""".replace("DOMAIN_NAMES", repr(list(DOMAINS)))


def run_data(data, block, seed, rank) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", DATA_CODE, data, str(block), str(seed), str(rank)],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if p.returncode:
        raise RuntimeError(f"data measurement failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main


def fmt_n(n: int) -> str:
    for unit, v in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= v:
            return f"{n / v:g}{unit}"
    return str(n)


def measure(tmp: str, args, n_docs: int, rows: list) -> None:
    data = os.path.join(tmp, "data")
    t = time.perf_counter()
    info = build_dataset(data, n_docs)
    idx_bytes = sum(
        os.path.getsize(os.path.join(data, d, f"{d}_content_document.idx")) for d in DOMAINS
    )
    tokens = sum(t for _, t in info.values())
    print(
        f"\n{fmt_n(n_docs)} documents, {tokens / 1e9:.0f}B tokens: index {idx_bytes / 1e9:.1f} GB "
        f"written in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    ckpt = os.path.join(tmp, "ckpt")
    for block in args.block_sizes:
        out = os.path.join(tmp, "out")

        def fresh(**kw):
            shutil.rmtree(out, ignore_errors=True)
            return run_trainer(ckpt, data, out, block, args.trainer_seed, **kw)

        cold_ok = drop_caches()
        cold = fresh(max_steps=1, stop_at=1)
        warm = [fresh(max_steps=1, stop_at=1) for _ in range(args.warm)]
        imp = [time_imports() for _ in range(args.warm)]
        fresh(max_steps=1)  # to its end: checkpoint-1
        resume = run_trainer(ckpt, data, out, block, args.trainer_seed, max_steps=2, stop_at=2)
        shutil.rmtree(out, ignore_errors=True)
        dat = [run_data(data, block, s, r) for s in args.seeds for r in (0, 7)]
        row = {
            "docs": n_docs,
            "tokens": tokens,
            "index_bytes": idx_bytes,
            "block_size": block,
            "cold_s": cold["seconds"] if cold_ok else None,
            "first_s": None if cold_ok else cold["seconds"],
            "warm_s": statistics.median(w["seconds"] for w in warm),
            "resume_s": resume["seconds"],
            "imports_s": statistics.median(w for w, _ in imp),
            "warm_cpu_s": statistics.median(w["cpu_s"] for w in warm),
            "resume_cpu_s": resume["cpu_s"],
            "imports_cpu_s": statistics.median(c for _, c in imp),
            "step_s": statistics.median(w["step_s"] for w in warm),
            "peak_rss": max([cold["hwm"], resume["hwm"]] + [w["hwm"] for w in warm]),
            "data_start_ms": max(x["start_ms"] for x in dat),
            "data_resume_ms": max(x["resume_ms"] for x in dat),
            "data_extra": max(x["extra"] for x in dat),
            "hwm_reset": all(x["reset"] for x in dat),
            "load": os.getloadavg()[0],
        }
        rows.append(row)
        cold_txt = (
            f"cold {row['cold_s']:.1f} s"
            if cold_ok
            else f"first run {row['first_s']:.1f} s (page cache NOT dropped: not root?)"
        )
        print(
            f"  block {block}: {cold_txt}, warm {row['warm_s']:.1f} s (median of "
            f"{args.warm}; step 1 itself {row['step_s']:.1f} s; CPU {row['warm_cpu_s']:.1f} s), "
            f"resume {row['resume_s']:.1f} s (CPU {row['resume_cpu_s']:.1f} s), imports alone "
            f"{row['imports_s']:.1f} s (CPU {row['imports_cpu_s']:.1f} s), peak RSS "
            f"{row['peak_rss'] / 2**30:.2f} GiB; data alone (seeds {args.seeds}, DP ranks 0 "
            f"and 7 of 8): start + first batch <= {row['data_start_ms']:.0f} ms, resume + "
            f"batch <= {row['data_resume_ms']:.0f} ms, <= {row['data_extra'] / 2**20:.1f} MiB; "
            f"load {row['load']:.1f}",
            flush=True,
        )
    shutil.rmtree(data)


def table(rows: list) -> str:
    head = (
        "| documents | tokens | block | time to step 1: cold / warm / resume (s) | "
        "CPU time to step 1: warm / resume (s) | step 1 alone (s) | imports alone: wall / "
        "CPU (s) | peak RSS (GiB) | data alone: start / resume (ms) | sampling memory (MiB) |"
        "\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        first = (
            f"{r['cold_s']:.1f}" if r["cold_s"] is not None else f"{r['first_s']:.1f} (not cold)"
        )
        lines.append(
            f"| {fmt_n(r['docs'])} | {r['tokens'] / 1e9:.0f}B | {r['block_size']} | "
            f"{first} / {r['warm_s']:.1f} / {r['resume_s']:.1f} | "
            f"{r['warm_cpu_s']:.1f} / {r['resume_cpu_s']:.1f} | {r['step_s']:.1f} | "
            f"{r['imports_s']:.1f} / {r['imports_cpu_s']:.1f} | "
            f"{r['peak_rss'] / 2**30:.2f} | {r['data_start_ms']:.0f} / "
            f"{r['data_resume_ms']:.0f} | {r['data_extra'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    need = max(args.docs) * 21  # index bytes of the largest dataset (~20 per document)
    free = shutil.disk_usage(args.tmp).free
    if need > free - 2 * 2**30:
        print(
            f"--tmp {args.tmp}: {free / 1e9:.0f} GB free, the {fmt_n(max(args.docs))}-document "
            f"index needs ~{need / 1e9:.0f} GB",
            file=sys.stderr,
        )
        return 2
    tmp = tempfile.mkdtemp(prefix="megamoe-startup-", dir=args.tmp)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    rows: list = []
    try:
        make_checkpoint(os.path.join(tmp, "ckpt"))
        print(f"{os.cpu_count()} CPUs; {sys.executable}; temporary folder {tmp}", flush=True)
        for n in args.docs:
            measure(tmp, args, n, rows)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if rows:
            print("\n" + table(rows))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
