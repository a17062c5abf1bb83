"""The README's demo: the whole LLaMA-MoE pipeline on a tiny scale, in a few minutes on a CPU.

    python -m megamoe.demo [--output_dir demo_output] [--max_steps 120] [--quick]

1. a seven-domain corpus made here (no download), domains of clearly different difficulty:
   templated code and logs (easy), arithmetic, chat and encyclopaedia-like sentences (middle),
   Zipf-Markov prose and random words (hard)
2. a sentencepiece tokenizer (BPE, 512 pieces) trained on it
3. tools/preprocess_data.py: jsonl -> Megatron indexed datasets, one folder per domain
   (training and validation)
4. a tiny dense LLaMA in Hugging Face format (transformers, random init, save_pretrained)
5. tools/convert_hf_checkpoint.py: -> LLaMA-MoE, 16 experts, top-4, random split
6. python -m megamoe.train: continual pre-training with --dynamic_data_selection sheared_llama
   (reference losses: a bigram model of each domain), evaluation every few steps, checkpoints,
   tensorboard, and the export to Hugging Face LLaMA-MoE at the end
7. a summary: where the checkpoint, the export and the tensorboard logs are, and the final
   per-domain losses and weights

Everything runs in this one process (a world of one; on a GPU if there is one). Steps 1-5 are
skipped when their outputs exist; the training resumes an interrupted run and starts afresh
after a complete one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import is_checkpoint
from .command import FlagParser
from .outputs import mark, written_by

DOMAINS = ["code", "logs", "math", "chat", "wiki", "prose", "noise"]
VOCAB = 512


# ---------------------------------------------------------------------------------------------
# 1. the corpus


def _words(rng: random.Random, n: int, lo: int = 2, hi: int = 8) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters) for _ in range(rng.randint(lo, hi))))
    return sorted(out)


class Corpus:
    """Deterministic generators, one per domain (difficulty roughly increasing)."""

    def __init__(self, seed: int = 0):
        r = random.Random(seed)
        self.names = _words(r, 40, 3, 7)
        self.nouns = _words(r, 120)
        self.adjs = _words(r, 60)
        self.verbs = _words(r, 60)
        self.vocab = _words(r, 400)
        zipf = np.array([1.0 / (i + 1) for i in range(len(self.vocab))])
        self.zipf = zipf / zipf.sum()
        nr = np.random.default_rng(seed)
        # a sparse Markov chain over the prose vocabulary
        self.next = [nr.choice(len(self.vocab), size=6, p=self.zipf) for _ in self.vocab]

    def code(self, r: random.Random) -> str:
        fn = r.choice(self.names)
        lines = [f"def {fn}(x, y):"]
        for i in range(r.randint(2, 6)):
            v = r.choice(self.names)
            lines.append(f"    {v} = x + {i}")
            lines.append(f"    if {v} > y:")
            lines.append(f"        return {v}")
        lines.append("    return None")
        return "\n".join(lines)

    def logs(self, r: random.Random) -> str:
        out = []
        for _ in range(r.randint(3, 8)):
            lvl = r.choice(["INFO", "INFO", "INFO", "WARN", "ERROR"])
            out.append(
                f"2026-11-{r.randint(10, 28)} 12:{r.randint(10, 59)}:00 {lvl} worker-"
                f"{r.randint(1, 4)} job {r.choice(self.names)} "
                f"{'started' if lvl == 'INFO' else 'failed'}"
            )
        return "\n".join(out)

    def math(self, r: random.Random) -> str:
        out = []
        for _ in range(r.randint(4, 10)):
            a, b = r.randint(1, 99), r.randint(1, 99)
            op = r.choice("+-")
            out.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}.")
        return " ".join(out)

    def chat(self, r: random.Random) -> str:
        n = r.choice(self.nouns)
        return (
            f"User: what is a {n}?\nAssistant: a {n} is a {r.choice(self.adjs)} "
            f"{r.choice(self.nouns)} that can {r.choice(self.verbs)}.\nUser: can it "
            f"{r.choice(self.verbs)}?\nAssistant: {r.choice(['yes', 'no', 'sometimes'])}, "
            f"it {r.choice(self.verbs)}s {r.choice(self.nouns)}s."
        )

    def wiki(self, r: random.Random) -> str:
        s = []
        for _ in range(r.randint(3, 6)):
            s.append(
                f"The {r.choice(self.adjs)} {r.choice(self.nouns)} of "
                f"{r.choice(self.names).title()} was {r.choice(self.verbs)}ed in "
                f"{r.randint(1500, 2020)} by the {r.choice(self.nouns)}s."
            )
        return " ".join(s)

    def prose(self, r: random.Random) -> str:
        nr = np.random.default_rng(r.getrandbits(32))
        w = int(nr.choice(len(self.vocab), p=self.zipf))
        out = []
        for _ in range(r.randint(40, 90)):
            out.append(self.vocab[w])
            w = (
                int(self.next[w][nr.integers(6)])
                if nr.random() < 0.85
                else int(nr.choice(len(self.vocab), p=self.zipf))
            )
        return " ".join(out) + "."

    def noise(self, r: random.Random) -> str:
        return " ".join(r.choice(self.vocab) for _ in range(r.randint(40, 90)))

    def documents(self, domain: str, n: int, seed: int) -> list[str]:
        r = random.Random(f"{domain}-{seed}")
        gen = getattr(self, domain)
        return [gen(r) for _ in range(n)]


def write_corpus(root: str, n_train: int, n_valid: int) -> None:
    c = Corpus(0)
    for split, n, seed in (("train", n_train, 1), ("valid", n_valid, 2)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for d in DOMAINS:
            with open(os.path.join(root, split, f"{d}.jsonl"), "w") as f:
                for doc in c.documents(d, n, seed):
                    f.write(json.dumps({"text": doc}) + "\n")


# ---------------------------------------------------------------------------------------------
# 2.-5.


def train_tokenizer(corpus_dir: str, prefix: str) -> str:
    import sentencepiece as spm

    text = os.path.join(os.path.dirname(prefix), "tokenizer_corpus.txt")
    with open(text, "w") as out:
        for d in DOMAINS:
            with open(os.path.join(corpus_dir, "train", f"{d}.jsonl")) as f:
                for i, line in enumerate(f):
                    if i >= 200:
                        break
                    out.write(json.loads(line)["text"].replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.train(
        input=text,
        model_prefix=prefix,
        vocab_size=VOCAB,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        byte_fallback=True,
    )
    return prefix + ".model"


def preprocess(corpus_dir: str, data_dir: str, tokenizer: str) -> None:
    from .data.preprocess import main as preprocess_main

    for split in ("train", "valid"):
        argv = [
            "--input",
            os.path.join(corpus_dir, split),
            "--domain-folders",
            "--output-prefix",
            os.path.join(data_dir, split),
            "--json-keys",
            "text",
            "--tokenizer-model",
            tokenizer,
            "--legacy-tokenizer",
            "--append-eod",
            "--workers",
            "1",
            "--no-progress",
        ]
        _show("python tools/preprocess_data.py", argv)
        if preprocess_main(argv) != 0:
            raise SystemExit("demo: preprocessing failed (see above)")


def make_dense_hf(path: str, layers: int, hidden: int, ffn: int, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def convert(hf_dir: str, out: str) -> None:
    from .convert import main as convert_main

    argv = [
        "hf-to-megamoe",
        "--hf-dir",
        hf_dir,
        "--output",
        out,
        "--model-type",
        "llama_moe",
        "--num-experts",
        "16",
        "--num-selects",
        "4",
        "--split",
        "random",
        "--split-seed",
        "0",
        "--overwrite",
        "--no-progress",
    ]
    _show("python tools/convert_hf_checkpoint.py", argv)
    if convert_main(argv) != 0:
        raise SystemExit("demo: the conversion failed (see above)")


def bigram_ref_losses(data_dir: str) -> dict:
    """Each domain's validation loss (nats/token) under an add-0.1 bigram model of its training
    data: a cheap stand-in for the reference losses of a stronger model."""
    from .data.indexed import IndexedDataset
    from .data.packing import find_prefixes

    out = {}
    for d in DOMAINS:

        def tokens(split):
            return np.concatenate(
                [
                    np.asarray(IndexedDataset(p).tokens, np.int64)
                    for p in find_prefixes(os.path.join(data_dir, split, d))
                ]
            )

        tr, va = tokens("train"), tokens("valid")
        counts = np.full((VOCAB, VOCAB), 0.1)
        np.add.at(counts, (tr[:-1], tr[1:]), 1.0)
        probs = counts / counts.sum(1, keepdims=True)
        out[d] = float(-np.log(probs[va[:-1], va[1:]]).mean())
    return out


def _show(cmd: str, argv: list) -> None:
    print(f"\n$ {cmd} " + " ".join(a if " " not in a else repr(a) for a in argv), flush=True)


# ---------------------------------------------------------------------------------------------


def main(argv=None, prog: str = "python -m megamoe.demo") -> int:
    p = FlagParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--max_steps", type=int, default=120)
    p.add_argument("--eval_steps", type=int, default=10)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smaller corpus, model and run (the test suite's end-to-end check)",
    )
    a = p.parse_args(argv)
    from .train.main import quiet_library_noise

    quiet_library_noise()
    t0 = time.time()
    out = os.path.abspath(a.output_dir)
    # the demo removes and rewrites parts of its folder: only ever one it made itself
    if os.path.isdir(out) and os.listdir(out) and written_by(Path(out)) != "megamoe demo":
        print(
            f"demo: --output_dir {out} holds files the demo did not write; choose an empty or "
            "new folder",
            file=sys.stderr,
        )
        return 2
    os.makedirs(out, exist_ok=True)
    mark(Path(out), "megamoe demo")
    quick = a.quick
    n_train, n_valid = (150, 20) if quick else (400, 40)
    layers, hidden, ffn = (2, 64, 256) if quick else (4, 128, 512)
    max_steps = min(a.max_steps, 12) if quick else a.max_steps
    eval_steps = min(a.eval_steps, 4) if quick else a.eval_steps

    corpus = os.path.join(out, "corpus")
    print(f"[1/6] corpus: {len(DOMAINS)} domains ({', '.join(DOMAINS)}) -> {corpus}", flush=True)
    if not os.path.isfile(os.path.join(corpus, "valid", f"{DOMAINS[-1]}.jsonl")):
        write_corpus(corpus, n_train, n_valid)
    tok = os.path.join(out, "tokenizer", "tokenizer.model")
    print(f"[2/6] sentencepiece tokenizer ({VOCAB} pieces) -> {tok}", flush=True)
    if not os.path.isfile(tok):
        os.makedirs(os.path.dirname(tok), exist_ok=True)
        train_tokenizer(corpus, tok[: -len(".model")])
    data = os.path.join(out, "data")
    print(f"[3/6] preprocess_data.py -> {data}/{{train,valid}}/<domain>/", flush=True)
    if not os.path.isfile(
        os.path.join(data, "valid", DOMAINS[-1], f"{DOMAINS[-1]}_text_document.idx")
    ):
        shutil.rmtree(data, ignore_errors=True)
        preprocess(corpus, data, tok)
    hf = os.path.join(out, "llama-dense-hf")
    print(
        f"[4/6] tiny dense LLaMA ({layers} layers, hidden {hidden}, FFN {ffn}), Hugging Face "
        f"format -> {hf}",
        flush=True,
    )
    if not os.path.isfile(os.path.join(hf, "config.json")):
        make_dense_hf(hf, layers, hidden, ffn)
    moe = os.path.join(out, "llama-moe-16x4")
    print(f"[5/6] LLaMA-MoE: 16 experts, top-4, random split -> {moe}", flush=True)
    if not is_checkpoint(moe):
        convert(hf, moe)
    refs = bigram_ref_losses(data)
    ref_file = os.path.join(out, "ref_loss.json")
    with open(ref_file, "w") as f:
        json.dump(refs, f, indent=1)
    print(
        "reference losses (bigram model of each domain): "
        + ", ".join(f"{k} {v:.2f}" for k, v in refs.items()),
        flush=True,
    )

    run_dir = os.path.join(out, "run")
    log = os.path.join(run_dir, "train_log.jsonl")
    if os.path.isfile(log) and any(json.loads(line).get("kind") == "end" for line in open(log)):
        print(f"a previous demo run in {run_dir} is complete: starting a fresh one", flush=True)
        shutil.rmtree(run_dir)
    import torch

    cuda = torch.cuda.is_available()
    targv = [
        "--model_type",
        "llama_moe",
        "--pretrained_model",
        moe,
        "--tokenizer_model",
        tok,
        "--dataset_dir",
        os.path.join(data, "train"),
        "--validation_dir",
        os.path.join(data, "valid"),
        "--output_dir",
        run_dir,
        "--block_size",
        "64",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        str(max_steps),
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        str(max(1, max_steps // 10)),
        "--final_lr_portion",
        "0.1",
        "--logging_steps",
        "2" if quick else "5",
        "--eval_steps",
        str(eval_steps),
        "--eval_at_start",
        "--save_steps",
        str(max_steps // 2),
        "--save_total_limit",
        "2",
        "--max_eval_blocks",
        "8" if quick else "24",
        "--dynamic_data_selection",
        "sheared_llama",
        "--prob_map",
        "uniform",
        "--ref_loss",
        ref_file,
        "--dds_eta",
        "0.5",
        "--seed",
        "1227",
        "--export_hf",
        "--comment",
        "megamoe demo",
    ] + (["--bf16"] if cuda else [])
    print(
        f"[6/6] continual pre-training{' on ' + torch.cuda.get_device_name() if cuda else ' on CPU'}",
        flush=True,
    )
    _show("python -m megamoe.train", targv)
    from .train.main import main as train_main

    code = train_main(targv)
    if code != 0:
        print(f"demo: training exited with code {code}", file=sys.stderr)
        return code
    summary(run_dir, time.time() - t0)
    return 0


def summary(run_dir: str, seconds: float) -> None:
    from .checkpoint import list_checkpoints

    evals, end = [], None
    for line in open(os.path.join(run_dir, "train_log.jsonl")):
        r = json.loads(line)
        if r["kind"] == "eval":
            evals.append(r)
        elif r["kind"] == "end":
            end = r
    ckpts = list_checkpoints(run_dir)
    runs = sorted(os.listdir(os.path.join(run_dir, "runs")))
    first, last = evals[0], evals[-1]
    print("\n" + "=" * 78)
    print(f"demo finished in {seconds / 60:.1f} min")
    print(f"checkpoint:   {ckpts[-1][1] if ckpts else end and end.get('checkpoint')}")
    print(f"Hugging Face: {os.path.join(run_dir, 'hf')}  (LLaMA-MoE, 16 experts, top-4)")
    print(
        f"tensorboard:  tensorboard --logdir {os.path.join(run_dir, 'runs')}"
        f"   (this run: runs/{runs[-1]})"
    )
    print(f"logs:         {os.path.join(run_dir, 'train.log')}")
    print(
        f"\n{'domain':<8} {'loss (step ' + str(first['step']) + ')':>16} "
        f"{'loss (step ' + str(last['step']) + ')':>16} {'weight':>8} -> {'weight':>8}"
    )
    w0 = evals[0]["weights"]
    initial = {d: 1.0 / len(w0) for d in w0}
    for d in last["losses"]:
        print(
            f"{d:<8} {first['losses'][d]:>16.4f} {last['losses'][d]:>16.4f} "
            f"{initial[d]:>8.4f} -> {last['weights'][d]:>8.4f}"
        )
    spec = last.get("specialisation")
    if spec:
        print(
            "routing specialisation by layer (0 = domain-blind, 1 = disjoint experts): "
            + " ".join(f"{x:.3f}" for x in spec)
        )
    print("=" * 78, flush=True)


if __name__ == "__main__":  # guard: dist_checkpointing's save spawns a process
    sys.exit(main())
