"""Bad flags fail before any work with a clear message (exit 2); a scale factor that is not
#experts / #selected only warns. Flags, config files and the learning-rate schedule."""

import json
import subprocess
import sys
import time

import pytest

from megamoe.config import parse_run_config
from megamoe.findings import ConfigError
from megamoe.train import plan as preflight
from tests.train import fixtures as F

ENV1 = {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}


def _plan(tiny, tmp_path, env=ENV1, **flags):
    argv = F.train_argv(tiny.moe, tiny.data, tiny.valid, str(tmp_path / "out"), **flags)
    return preflight.plan(parse_run_config(argv), env=env, cuda=False)


def _error(tiny, tmp_path, env=ENV1, **flags) -> str:
    with pytest.raises(ConfigError) as e:
        _plan(tiny, tmp_path, env=env, **flags)
    return str(e.value)


def test_valid_flags_make_a_plan(tiny, tmp_path):
    p = _plan(tiny, tmp_path, max_tokens="2560", max_steps=None)
    assert p.max_steps == 20 and p.global_batch_size == 4 and p.tokens_per_batch == 128
    assert list(p.domains) == sorted(F.DOMAINS) and p.prob_map == "uniform"
    assert p.moe.num_experts == 4 and p.moe.num_selects == 2 and not p.warnings
    assert p.resume_from is None and not p.use_distributed_optimizer


def test_scale_factor_not_e_over_k_is_a_warning(tiny, tmp_path):
    p = _plan(tiny, tmp_path, moe_calculator_score_scale_factor=3.0)
    assert p.moe.score_scale_factor == 3.0
    assert any(
        "--moe_calculator_score_scale_factor 3.0 is not #experts / #selected = 4/2 = 2" in w
        for w in p.warnings
    ), p.warnings
    assert not _plan(tiny, tmp_path, moe_calculator_score_scale_factor=2.0).warnings


def test_overlap_flags_that_do_nothing_warn(tiny, tmp_path):
    p = _plan(tiny, tmp_path, overlap_grad_reduce="true")  # one process: one data-parallel rank
    assert any("--overlap_grad_reduce has nothing to overlap" in w for w in p.warnings), p.warnings
    p = _plan(tiny, tmp_path, ddp_bucket_size=1000)
    assert any(
        "--ddp_bucket_size 1000 applies with --overlap_grad_reduce only" in w for w in p.warnings
    )


def test_gpu_attention_kernel_refused_on_cpu(tiny, tmp_path):
    assert _plan(tiny, tmp_path, attention_backend="math").run.train.attention_backend == "math"
    err = _error(tiny, tmp_path, attention_backend="cudnn")
    assert "--attention_backend cudnn is a GPU kernel" in err and "auto or math" in err, err


def test_groups_across_nodes_warn():
    from megamoe.config import RunConfig

    run = RunConfig()
    assert preflight.layout_advice(2, 4, 8, nodes=2, gpn=8, run=run) == []  # 2 x 4 ranks: one node
    (w,) = preflight.layout_advice(16, 1, 1, nodes=2, gpn=8, run=run)
    assert "--tensor_model_parallel_size 16 > 8 GPUs per node" in w.text()
    (w,) = preflight.layout_advice(4, 4, 4, nodes=2, gpn=8, run=run)
    assert "every MoE layer's all-to-all crosses nodes" in w.text()
    assert preflight.layout_advice(4, 4, 4, nodes=1, gpn=16, run=run) == []


def test_num_selects_above_num_experts(tiny, tmp_path):
    msg = _error(tiny, tmp_path, num_selects=8)
    assert "--num_selects 8 must be between 1 and the number of experts 4" in msg


def test_unknown_domain_in_prob_map(tiny, tmp_path):
    pm = tmp_path / "pm.json"
    pm.write_text(json.dumps({"code": 0.5, "prose": 0.3, "noise": 0.1, "github": 0.1}))
    msg = _error(tiny, tmp_path, prob_map=str(pm))
    assert "--prob_map" in msg and "github" in msg and "extra" in msg
    assert "--prob_map" in _error(tiny, tmp_path, prob_map="sheared_llama")  # SlimPajama names


def test_missing_data_path(tiny, tmp_path):
    msg = _error(tiny, tmp_path, dataset_dir=str(tmp_path / "nope"))
    assert "--dataset_dir" in msg and str(tmp_path / "nope") in msg
    msg = _error(tiny, tmp_path, pretrained_model=str(tmp_path / "nope"))
    assert f"--pretrained_model {tmp_path / 'nope'}: no such directory" in msg


def test_world_size_not_nodes_times_gpus(tiny, tmp_path):
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    msg = _error(tiny, tmp_path, env=env, num_nodes=1, num_gpu_per_node=4)
    assert "the world size is 2 process(es), but --num_nodes 1 x --num_gpu_per_node 4 = 4" in msg
    p = _plan(tiny, tmp_path, env=env, num_nodes=1, num_gpu_per_node=2)
    assert p.dp_size == 2 and p.global_batch_size == 8


def test_every_problem_is_reported_at_once(tiny, tmp_path):
    msg = _error(
        tiny,
        tmp_path,
        num_selects=8,
        dataset_dir=str(tmp_path / "nope"),
        dynamic_data_selection="sheared_llama",
        eval_steps=0,
    )
    assert len(msg.splitlines()) >= 3


def test_command_line_fails_before_any_work(tiny, tmp_path):
    out = tmp_path / "never"
    pm = tmp_path / "pm.json"
    pm.write_text(json.dumps({"code": 1, "prose": 1, "noise": 1, "github": 1}))
    argv = F.train_argv(tiny.moe, tiny.data, tiny.valid, str(out), num_selects=8, prob_map=str(pm))
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "megamoe.train", *argv],
        cwd=F.ROOT,
        env=F.clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert all(x.startswith("megamoe.train: error: ") for x in lines), lines
    assert any("--num_selects 8" in x for x in lines) and any("github" in x for x in lines)
    assert not out.exists()  # nothing was created
    assert "megatron" not in r.stderr.lower()
    # unknown flags: argparse's usage error, also exit 2
    r = subprocess.run(
        [sys.executable, "-m", "megamoe.train", "--no_such_flag", "1"],
        cwd=F.ROOT,
        env=F.clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "unrecognized arguments: --no_such_flag" in r.stderr
    print(f"failed in {time.time() - t0:.1f} s")


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "train:\n  max_steps: 7\n  bf16: true\nlearning_rate: 1e-3\n"
        "lora_targets: [q, v]\nmoe_calculator_score_scale_factor: [4, 8]\n"
    )
    run = parse_run_config(["--config", str(cfg), "--learning_rate", "5e-4", "--bf16", "false"])
    assert run.train.max_steps == 7 and run.optim.learning_rate == 5e-4 and run.train.bf16 is False
    assert run.train.lora_targets == ["q", "v"]
    assert run.moe.score_scale_factor == [4.0, 8.0]
    assert parse_run_config(["--max_tokens", "100B"]).train.max_tokens == 100_000_000_000
    cfg.write_text("no_such_key: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_run_config(["--config", str(cfg)])
    with pytest.raises(ConfigError, match="--gate_type 'Foo': choose one of"):
        parse_run_config(["--gate_type", "Foo"])


def test_lr_schedule():
    from megamoe.config import OptimConfig
    from megamoe.train.optim import lr_at

    c = OptimConfig(learning_rate=1.0, warmup_steps=4, final_lr_portion=0.1)
    lrs = [lr_at(i, c, 24) for i in range(24)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay
    assert lrs[14] == pytest.approx(0.5)  # half way
    assert min(lrs) == pytest.approx(0.1)  # the final_lr_portion floor
