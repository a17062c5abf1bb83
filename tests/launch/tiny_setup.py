"""Make a tiny run for launcher tests: `python tests/launch/tiny_setup.py DIR` writes

    DIR/train/<domain>/<domain>_text_document.{bin,idx}   three domains of different difficulty
    DIR/valid/<domain>/...                                their validation sets
    DIR/model/                                            a random LLaMA-MoE megamoe checkpoint
                                                          (hidden 64, 2 layers, 4 experts, top-2)
    DIR/tok.model                                         a sentencepiece tokenizer (64 pieces)

With the script variables of tests/integration/test_slurm.py (block 32, 2 x 1 per process, 2
processes) a step is 128 tokens.
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
DOMAINS = ["code", "prose", "noise"]
VOCAB = 64  # the tokenizer's 64 pieces (a larger vocabulary is refused as another model's)


def write_domains(root: str, seed: int) -> None:
    from megamoe.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    for k, dom in enumerate(DOMAINS):
        w = IndexedDatasetWriter(os.path.join(root, dom, f"{dom}_text_document"), np.uint16)
        for _ in range(30):
            n = int(rng.integers(20, 80))
            if k == 0:  # a repeated pattern: easy
                doc = np.resize(rng.integers(3, VOCAB, size=int(rng.integers(3, 7))), n)
            elif k == 1:  # few distinct tokens
                doc = rng.integers(3, 19, size=n)
            else:  # uniform noise: hard
                doc = rng.integers(3, VOCAB, size=n)
            w.add_document(np.concatenate([[1], doc]).astype(np.int64))
        w.finalize()


def write_tokenizer(prefix: str) -> None:
    import random

    import sentencepiece as spm

    rnd = random.Random(0)
    words = [
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 7)))
        for _ in range(200)
    ]
    lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=prefix,  # the
        vocab_size=VOCAB,
        model_type="bpe",
        minloglevel=2,
    )  # model's


def write_model(path: str) -> None:
    from megamoe import checkpoint, parallel
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.model.llama import build_model

    m = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    e = MoEConfig(num_experts=4, num_selects=2)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    parallel.initialize(parallel.ParallelLayout(), seed=0)
    checkpoint.save(path, build_model(m, e), checkpoint.make_meta(m, e))


def main(out: str) -> None:
    write_domains(os.path.join(out, "train"), 0)
    write_domains(os.path.join(out, "valid"), 1)
    write_tokenizer(os.path.join(out, "tok"))
    write_model(os.path.join(out, "model"))
    open(os.path.join(out, "done"), "w").close()


def ensure(out, env=None) -> str:
    """Build the tiny run in `out` once (a subprocess: a world of one), reuse it after."""
    import subprocess

    out = str(out)
    if not os.path.exists(os.path.join(out, "done")):
        r = subprocess.run(
            [sys.executable, os.path.abspath(__file__), out],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        if r.returncode != 0:
            raise RuntimeError(f"tiny_setup.py failed:\n{r.stdout}\n{r.stderr}")
    return out


if __name__ == "__main__":  # dist_checkpointing's save spawns a process
    main(sys.argv[1])
