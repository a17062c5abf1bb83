"""The README's demo end to end (its --quick size): corpus -> tokenizer -> preprocess_data.py
-> dense HF LLaMA -> LLaMA-MoE (16 experts, top-4) -> training with dynamic data selection ->
Hugging Face export, and the summary it ends with."""

import json
import os
import subprocess
import sys

from tests.train import fixtures as F

DOMAINS = ["code", "logs", "math", "chat", "wiki", "prose", "noise"]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "megamoe.demo", "--quick", "--output_dir", str(out)],
        cwd=F.ROOT,
        env=F.clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout
    for marker in (
        "[1/6] corpus",
        "[3/6] preprocess_data.py",
        "$ python tools/preprocess_data.py",
        "$ python tools/convert_hf_checkpoint.py hf-to-megamoe",
        "--num-experts 16",
        "--num-selects 4",
        "$ python -m megamoe.train",
        "max_steps: 12",
        "global batch size: 8",
        "#tokens/batch: 512",
        "demo finished in",
    ):
        assert marker in text, marker
    run = out / "run"
    assert f"checkpoint:   {run / 'checkpoint-12'}" in text
    assert f"tensorboard:  tensorboard --logdir {run / 'runs'}" in text
    assert f"Hugging Face: {run / 'hf'}" in text
    # the final table: every domain, its losses and weights
    table = text[text.index("domain ") :].splitlines()
    rows = {x.split()[0]: x.split() for x in table[1:] if x.split() and x.split()[0] in DOMAINS}
    assert sorted(rows) == sorted(DOMAINS)
    first = {d: float(v[1]) for d, v in rows.items()}
    last = {d: float(v[2]) for d, v in rows.items()}
    weights = {d: float(v[5]) for d, v in rows.items()}
    assert sum(last.values()) < sum(first.values())  # it learned
    assert abs(sum(weights.values()) - 1) < 1e-3
    assert max(abs(w - 1 / 7) for w in weights.values()) > 0.02  # the weights moved
    cfg = json.load(open(run / "hf" / "config.json"))
    assert cfg["model_type"] == "llama_moe" and cfg["num_experts"] == 16 and cfg["num_selects"] == 4
    assert os.path.isfile(run / "hf" / "tokenizer.model")
    assert os.listdir(run / "runs")
