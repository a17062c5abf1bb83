"""tools/convert_hf_checkpoint.py as users run it: a separate python process (the script's
__main__ guard matters: dist_checkpointing's save spawns a process)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_hf_checkpoint.py")


def _tool(*argv):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a fresh world of one
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, TOOL, *argv], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_help_and_error():
    r = _tool("--help")
    assert r.returncode == 0 and "hf-to-megamoe" in r.stdout and "megamoe-to-hf" in r.stdout
    r = _tool("hf-to-megamoe", "--help")
    for flag in (
        "--num-experts",
        "--num-selects",
        "--split",
        "--gate-network",
        "--score-scale-factor",
        "--split-seed",
        "--tensor-model-parallel-size",
    ):
        assert flag in r.stdout
    r = _tool("hf-to-megamoe", "--hf-dir", "/nonexistent/llama", "--output", "/tmp/x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        "convert_hf_checkpoint.py: error: --hf-dir /nonexistent/llama: no such directory"
        in r.stderr
    )


def test_cli_hf_to_llama_moe(tmp_path, hf_dir):
    out = tmp_path / "llama_moe"
    r = _tool(
        "hf-to-megamoe",
        "--hf-dir",
        str(hf_dir),
        "--output",
        str(out),
        "--model-type",
        "llama_moe",
        "--num-experts",
        "4",
        "--num-selects",
        "2",
        "--split",
        "random",
        "--split-seed",
        "1",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hf-to-megamoe: 100%" in r.stderr  # the per-layer progress bar
    meta = json.loads((out / "megamoe.json").read_text())
    assert meta["model_type"] == "llama_moe" and meta["split"] == "random"
    assert sorted(p.name for p in (out / "split").iterdir()) == ["layer_0.json", "layer_1.json"]
    assert not [p for p in tmp_path.iterdir() if p.name != "llama_moe"]  # no temporary leftovers
