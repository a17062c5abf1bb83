"""Tokens/s of tools/preprocess_data.py (1, 2, ... workers) against a straightforward
single-process loop (json.loads -> sentencepiece encode -> megatron-core IndexedDatasetBuilder,
one document at a time), on a generated corpus and a sentencepiece model trained here.

    .venv/bin/python benchmarks/preprocess.py [--docs 20000] [--workers 1 2] [--repeat 3]

All runs must produce byte-identical .bin/.idx files (checked). Megatron-LM's own
tools/preprocess_data.py is not part of the megatron-core wheel, so it is not compared here.
"""

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_corpus(d, docs, seed=0):
    """Zipf-distributed pseudo-words, documents of 20-1200 words (about 0.7 KB - 8 KB)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(20000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    path = os.path.join(d, "corpus.jsonl")
    with open(path, "w") as f:
        for _ in range(docs):
            words = rng.choices(vocab, weights, k=rng.randint(20, 1200))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    with open(os.path.join(d, "sp_train.txt"), "w") as f:
        for _ in range(20000):
            f.write(" ".join(rng.choices(vocab, weights, k=30)) + "\n")
    return path


def train_tokenizer(d):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=os.path.join(d, "sp_train.txt"),
        model_prefix=os.path.join(d, "tok"),
        vocab_size=8000,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return os.path.join(d, "tok.model")


def naive(inp, prefix, model):
    """What one writes first: one process, one document at a time."""
    import numpy as np
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=model)
    b = IndexedDatasetBuilder(prefix + "_text_document.bin", dtype=np.uint16)
    tokens = 0
    with open(inp) as f:
        for line in f:
            ids = [sp.bos_id()] + sp.encode(json.loads(line)["text"])
            b.add_document(torch.tensor(ids), [len(ids)])
            tokens += len(ids)
    b.finalize(prefix + "_text_document.idx")
    return tokens


def ours(inp, prefix, model, workers):
    from megamoe.data.preprocess import preprocess

    return preprocess(inp, prefix, model, workers=workers, progress=False)["tokens"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="keep the corpus and outputs in this folder")
    a = ap.parse_args()
    d = a.keep or tempfile.mkdtemp(prefix="megamoe-bench-")
    os.makedirs(d, exist_ok=True)
    try:
        inp = make_corpus(d, a.docs)
        model = train_tokenizer(d)
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (import time not measured)

        runs = [("straightforward loop (1 process)", lambda p: naive(inp, p, model))]
        runs += [
            (f"preprocess_data.py --workers {w}", lambda p, w=w: ours(inp, p, model, w))
            for w in a.workers
        ]
        rows, reference = [], None
        load0 = os.getloadavg()[0]
        for name, fn in runs:
            times, cpus = [], []
            for _ in range(a.repeat):
                prefix = os.path.join(d, f"out{len(rows)}")
                c0, t0 = os.times(), time.perf_counter()
                tokens = fn(prefix)
                times.append(time.perf_counter() - t0)
                c1 = os.times()  # CPU of this process and of its (joined) worker processes
                cpus.append(sum(c1[:4]) - sum(c0[:4]))
                out = [open(prefix + "_text_document." + e, "rb").read() for e in ("bin", "idx")]
                reference = reference or out
                assert out == reference, f"{name}: output differs from the other runs"
            best, med = min(times), statistics.median(times)
            rows.append((name, tokens, best, tokens / best, tokens / med, min(cpus)))
        size_mb = os.path.getsize(inp) / 1e6
        print(
            f"\ncorpus: {a.docs:,} documents, {size_mb:.1f} MB jsonl, {rows[0][1]:,} tokens "
            f"(sentencepiece BPE, 8000 pieces); {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}; best and median of {a.repeat}; "
            f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after\n"
        )
        print(
            "| method | wall s (best) | tokens/s (best) | tokens/s (median) | vs loop "
            "| CPU s | tokens per CPU-s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, tokens, best, tps, tpm, cpu in rows:
            print(
                f"| {name} | {best:.2f} | {tps:,.0f} | {tpm:,.0f} | {tps / rows[0][3]:.2f}x "
                f"| {cpu:.2f} | {tokens / cpu:,.0f} |"
            )
        print("\nall outputs byte-identical: yes")
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
