"""megamoe estimate: the guide's log-header formulas and the wall time."""

import pytest

from megamoe.cli import main
from megamoe.ops.estimate import Estimate, format_duration, parse_number, report


def test_guide_example():
    # The guide's header: max_steps 63578, global batch size 768, #tokens/batch 1572864
    # (100B tokens, block 2048, 16 x 1 per device x 48 GPUs).
    e = Estimate(
        tokens=1e11,
        block_size=2048,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        num_nodes=6,
        num_gpu_per_node=8,
    )
    assert (e.max_steps, e.global_batch_size, e.tokens_per_batch) == (63578, 768, 1572864)


def test_recipe_112_gpus():
    e = Estimate(
        tokens=200e9,
        block_size=4096,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        num_nodes=14,
        num_gpu_per_node=8,
        seconds_per_step=40.0,
    )
    assert e.global_batch_size == 8 * 4 * 14 * 8 == 3584
    assert e.tokens_per_batch == 3584 * 4096
    assert e.max_steps == int(200e9 // (3584 * 4096))
    assert e.wall_seconds == e.max_steps * 40.0
    assert e.tokens_per_second_per_gpu == pytest.approx(3584 * 4096 / 40 / 112)


def test_tensor_pipeline_parallel_divide_the_batch():
    e = Estimate(
        tokens=1e9,
        block_size=1024,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_nodes=2,
        num_gpu_per_node=8,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
    )
    assert e.data_parallel_size == 4
    assert e.global_batch_size == 4 * 2 * 4


@pytest.mark.parametrize(
    "text,value",
    [
        ("100e9", 1e11),
        ("1e11", 1e11),
        ("200B", 2e11),
        ("1.5T", 1.5e12),
        ("10^11", 1e11),
        ("200*10^9", 2e11),
        ("1_000", 1000.0),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value)


def test_format_duration():
    assert format_duration(4.25) == "4.2s"
    assert format_duration(125) == "2m 5s"
    assert format_duration(3 * 3600 + 61) == "3h 1m 1s"
    assert format_duration(2 * 86400 + 3 * 3600 + 4 * 60) == "2d 3h 4m"


def test_validate():
    with pytest.raises(ValueError, match="less than one global batch"):
        Estimate(
            tokens=10,
            block_size=4096,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=4,
            num_nodes=1,
            num_gpu_per_node=8,
        ).validate()
    with pytest.raises(ValueError, match="not divisible"):
        Estimate(
            tokens=1e9,
            block_size=4096,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=4,
            num_nodes=1,
            num_gpu_per_node=6,
            tensor_model_parallel_size=4,
        ).validate()


def test_cli_prints_the_header_and_wall_time(capsys):
    rc = main(
        [
            "estimate",
            "--tokens",
            "100e9",
            "--block_size",
            "4096",
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "4",
            "--num_nodes",
            "14",
            "--num_gpu_per_node",
            "8",
            "--seconds_per_step",
            "30",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    steps = int(100e9 // (3584 * 4096))
    assert f"max_steps: {steps}\n" in out
    assert "global batch size: 3584\n" in out
    assert f"#tokens/batch: {3584 * 4096}\n" in out
    assert f"wall time: {format_duration(steps * 30)}" in out
    assert report(Estimate(1e11, 4096, 8, 4, 14, 8, seconds_per_step=30.0)) in out


def test_cli_throughput_and_missing_args(capsys):
    rc = main(
        [
            "estimate",
            "--tokens",
            "1e9",
            "--block_size",
            "1024",
            "--per_device_train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "1",
            "--num_nodes",
            "1",
            "--num_gpu_per_node",
            "1",
            "--tokens_per_second_per_gpu",
            "512",
        ]
    )
    assert rc == 0
    assert "time/step: 2s" in capsys.readouterr().out
    assert main(["estimate", "--tokens", "1e9", "--block_size", "1024"]) == 2
    assert "--per_device_train_batch_size" in capsys.readouterr().err


def test_cli_from_run(tmp_path, capsys):
    import json

    with open(tmp_path / "train_log.jsonl", "w") as f:
        f.write(json.dumps({"kind": "save", "step": 1}) + "\n")
        for step, t in enumerate([9.0] + [2.0] * 20, 1):
            f.write(json.dumps({"kind": "train", "step": step, "time_per_step": t}) + "\n")
    rc = main(
        [
            "estimate",
            "--tokens",
            "1e9",
            "--block_size",
            "1024",
            "--per_device_train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "1",
            "--num_nodes",
            "1",
            "--num_gpu_per_node",
            "1",
            "--from_run",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "measured in" in out and "time/step: 2s" in out
    assert (
        main(
            [
                "estimate",
                "--tokens",
                "1e9",
                "--block_size",
                "1024",
                "--per_device_train_batch_size",
                "1",
                "--gradient_accumulation_steps",
                "1",
                "--num_nodes",
                "1",
                "--num_gpu_per_node",
                "1",
                "--from_run",
                str(tmp_path / "nope"),
            ]
        )
        == 2
    )


def test_train_forwards_to_the_trainer(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--num_selects" in out and "--moe_calculator_score_scale_factor" in out


def test_every_entry_point_starts():
    """The guide's scripts and the megamoe command, as a user runs them: each prints its help."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commands = [
        [sys.executable, os.path.join(root, "tools", t), "--help"]
        for t in ("preprocess_data.py", "convert_hf_checkpoint.py", "split_domains.py")
    ]
    commands += [
        [sys.executable, "-m", "megamoe", v, "--help"]
        for v in (
            "train",
            "launch",
            "check",
            "estimate",
            "convert",
            "preprocess",
            "split-domains",
            "demo",
        )
    ]
    commands.append([sys.executable, "-m", "megamoe.train", "--help"])
    for cmd in commands:
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and len(r.stdout) > 200, (cmd, r.stdout, r.stderr)
