"""scripts/launch.sh's logic (megamoe/ops/launcher.py): argument building and refusals, no Slurm
needed."""

import os
import subprocess
import sys

import pytest

from megamoe.checkpoint.layout import training_finished
from megamoe.ops import launcher as L
from megamoe.ops.slurm import expand_nodelist, in_step, slurm_gpus_per_node

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = [
    "--model_type",
    "llama_moe",
    "--num_nodes",
    "2",
    "--num_gpu_per_node",
    "8",
    "--learning_rate",
    "2e-4",
]


def slurm_env(**kw):
    env = {
        "SLURM_JOB_ID": "1535835",
        "SLURM_JOB_NAME": "cpt-moe-fpt-bs16",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "SH-IDCA1404-10-140-54-[100,102]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "64",
    }
    env.update({k: str(v) for k, v in kw.items() if v is not None})
    for k in [k for k, v in kw.items() if v is None]:
        env.pop(k, None)
    return env


def hosts(nodelist):
    return expand_nodelist(nodelist)


def flag_value(argv, name):
    """The value of --name in an argument list (the last one), None if absent."""
    value = None
    for i, a in enumerate(argv):
        if a == "--" + name:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        elif a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
    return value


def always_free(port):
    return True


@pytest.fixture(autouse=True)
def names_resolve(monkeypatch):
    """The test clusters' host names resolve (see test_unresolvable_first_host)."""
    monkeypatch.setattr(L, "resolves", lambda host: True)


# ---- flags ------------------------------------------------------------------------------------


def test_set_flag_replaces_every_spelling():
    argv = ["--a_b", "1", "--c=2", "--a-b", "3", "--flag", "--a_b=4"]
    assert L.set_flag(argv, "a_b", "9") == ["--c=2", "--flag", "--a_b", "9"]
    assert L.set_flag(argv, "c", "5") == [
        "--a_b",
        "1",
        "--a-b",
        "3",
        "--flag",
        "--a_b=4",
        "--c",
        "5",
    ]


def test_sizes_from_flags_and_config_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("parallel:\n  num_nodes: 2\nnum_gpu_per_node: 4\n")
    argv = ["--config", str(cfg)]
    local = {"MEGAMOE_ALLOW_CPU": "1"}
    with pytest.raises(L.LaunchError, match="num_nodes=2 outside Slurm"):
        L.plan(argv, local, cuda_devices=lambda: 0)
    p = L.plan(
        argv + ["--num-nodes", "1"], local, cuda_devices=lambda: 0
    )  # flags win; either spelling
    assert p.nproc_per_node == 4
    with pytest.raises(L.LaunchError, match="refusing to start: --num_nodes 'two'"):
        L.plan(["--num_nodes", "two"], local, cuda_devices=lambda: 0)


# ---- Slurm environment ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist,expected",
    [
        ("node1", ["node1"]),
        ("n[01-03,7],m1", ["n01", "n02", "n03", "n7", "m1"]),
        (
            "SH-IDCA1404-10-140-54-[100,102]",
            ["SH-IDCA1404-10-140-54-100", "SH-IDCA1404-10-140-54-102"],
        ),
        ("a[1-2]-b[3-4]", ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]),
        ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),
    ],
)
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, 8),
        ({"SLURM_JOB_GPUS": "0,1,2,3"}, 4),
        ({"SLURM_STEP_GPUS": "2,3"}, 2),
        ({"SLURM_GPUS_PER_NODE": "gpu:8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "h100:4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "8"}, 8),
        ({"SLURM_JOB_GRES": "gres/gpu:2"}, 2),
        ({"SLURM_TRES_PER_NODE": "gres/gpu:a100:4"}, 4),
        ({"SLURM_JOB_GRES": "gres/nic:1"}, None),
        ({}, None),
    ],
)
def test_gpus_per_node(env, expected):
    assert slurm_gpus_per_node(env) == expected


def test_port_from_job_id_is_stable_and_in_range():
    p = L.port_from_job_id(1535835)
    assert p == L.port_from_job_id("1535835")
    assert 15000 <= p < 30000
    assert L.port_from_job_id(1535836) == p + 1
    for jid in (0, 14999, 15000, 10**9 + 7):
        assert 15000 <= L.port_from_job_id(jid) < 30000


def test_pick_port_skips_busy_ports():
    base = L.port_from_job_id(42)
    busy = {base, base + 1}
    assert L.pick_port(42, lambda p: p not in busy) == base + 2
    with pytest.raises(L.LaunchError, match="MASTER_PORT"):
        L.pick_port(42, lambda p: False, tries=3)


def test_in_step():
    assert not in_step({})
    assert not in_step({"SLURM_JOB_ID": "1"})
    assert in_step({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0"})
    assert not in_step({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "batch"})


# ---- the batch script: srun -------------------------------------------------------------------


def test_batch_plan_builds_srun():
    env = slurm_env()
    p = L.plan(FLAGS, env, python="/venv/bin/python", hostnames=hosts, is_free=always_free)
    assert p.mode == "srun"
    assert p.argv[:7] == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        "--mem=0",
    ]
    assert "--cpus-per-task=64" in p.argv and "--gres=gpu:8" in p.argv
    i = p.argv.index("/venv/bin/python")
    assert p.argv[i : i + 5] == ["/venv/bin/python", "-u", "-m", "megamoe", "launch"]
    assert p.env == {
        "MEGAMOE_MASTER_ADDR": "SH-IDCA1404-10-140-54-100",
        "MEGAMOE_MASTER_PORT": str(L.port_from_job_id(1535835)),
    }
    # outputs/<job-name>-<job-id>, the guide's layout
    assert flag_value(p.train_argv, "output_dir") == "outputs/cpt-moe-fpt-bs16-1535835"
    assert p.argv[i + 5 :] == p.train_argv
    assert (p.nnodes, p.nproc_per_node) == (2, 8)


def test_batch_plan_keeps_given_output_dir_and_fills_an_empty_one():
    env = slurm_env()
    p = L.plan(FLAGS + ["--output_dir", "/runs/x"], env, hostnames=hosts, is_free=always_free)
    assert flag_value(p.train_argv, "output_dir") == "/runs/x"
    p = L.plan(FLAGS + ["--output_dir", ""], env, hostnames=hosts, is_free=always_free)
    assert flag_value(p.train_argv, "output_dir") == "outputs/cpt-moe-fpt-bs16-1535835"
    assert p.train_argv.count("--output_dir") == 1


def test_unresolvable_first_host(monkeypatch):
    monkeypatch.setattr(L, "resolves", lambda host: False)
    with pytest.raises(L.LaunchError, match="does not resolve"):
        L.plan(FLAGS, slurm_env(), hostnames=hosts, is_free=always_free)
    p = L.plan(
        ["--num_nodes", "1", "--num_gpu_per_node", "8"],
        slurm_env(SLURM_JOB_NUM_NODES=1, SLURM_NNODES=1),
        hostnames=hosts,
        is_free=always_free,
    )
    assert p.env["MEGAMOE_MASTER_ADDR"] == "127.0.0.1"


def test_batch_plan_master_port_override():
    p = L.plan(FLAGS, slurm_env(MASTER_PORT="23456"), hostnames=hosts, is_free=always_free)
    assert p.env["MEGAMOE_MASTER_PORT"] == "23456"


def test_refuses_num_nodes_not_nodes():
    with pytest.raises(L.LaunchError) as e:
        L.plan(
            FLAGS,
            slurm_env(SLURM_JOB_NUM_NODES=1, SLURM_NNODES=1),
            hostnames=hosts,
            is_free=always_free,
        )
    msg = str(e.value)
    assert "num_nodes=2 but the job has 1 node(s)" in msg
    assert "set num_nodes=1" in msg and "#SBATCH --nodes=2" in msg


def test_refuses_gpus_not_gres():
    with pytest.raises(L.LaunchError) as e:
        L.plan(FLAGS, slurm_env(SLURM_GPUS_ON_NODE=4), hostnames=hosts, is_free=always_free)
    msg = str(e.value)
    assert "num_gpu_per_node=8 but the job has 4 GPU(s) per node" in msg
    assert "num_gpu_per_node=4" in msg and "--gres=gpu:8" in msg


def test_refuses_both_at_once():
    with pytest.raises(L.LaunchError) as e:
        L.plan(
            FLAGS,
            slurm_env(SLURM_JOB_NUM_NODES=1, SLURM_NNODES=1, SLURM_GPUS_ON_NODE=2),
            hostnames=hosts,
            is_free=always_free,
        )
    assert "num_nodes=2" in str(e.value) and "num_gpu_per_node=8" in str(e.value)


def test_no_gres_refused_unless_cpu_allowed():
    env = slurm_env(SLURM_GPUS_ON_NODE=None)
    with pytest.raises(L.LaunchError, match="no GPUs .*--gres=gpu:8.*MEGAMOE_ALLOW_CPU=1"):
        L.plan(FLAGS, env, hostnames=hosts, is_free=always_free)
    env["MEGAMOE_ALLOW_CPU"] = "1"
    p = L.plan(FLAGS, env, hostnames=hosts, is_free=always_free)
    assert (p.nnodes, p.nproc_per_node) == (2, 8)
    assert any("CPU" in n for n in p.notes)
    assert not any(a.startswith("--gres") for a in p.argv)


def test_missing_sizes_are_taken_from_the_job():
    p = L.plan(["--model_type", "llama"], slurm_env(), hostnames=hosts, is_free=always_free)
    assert (p.nnodes, p.nproc_per_node) == (2, 8)
    assert flag_value(p.train_argv, "num_nodes") == "2"
    assert flag_value(p.train_argv, "num_gpu_per_node") == "8"


def test_no_cpus_per_task_no_flag():
    p = L.plan(FLAGS, slurm_env(SLURM_CPUS_PER_TASK=None), hostnames=hosts, is_free=always_free)
    assert not any(a.startswith("--cpus-per-task") for a in p.argv)


# ---- each srun task: torchrun -----------------------------------------------------------------


def test_node_plan_builds_torchrun():
    env = slurm_env(
        SLURM_STEP_ID=0,
        SLURM_NODEID=1,
        SLURM_PROCID=1,
        SLURM_STEP_NUM_NODES=2,
        SLURM_STEP_NUM_TASKS=2,
        MEGAMOE_MASTER_ADDR="SH-IDCA1404-10-140-54-100",
        MEGAMOE_MASTER_PORT=21234,
    )
    flags = FLAGS + ["--output_dir", "outputs/x-1"]
    p = L.plan(flags, env, hostnames=hosts)
    assert p.mode == "node"
    assert p.argv[:12] == [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "8",
        "--node_rank",
        "1",
        "--master_addr",
        "SH-IDCA1404-10-140-54-100",
        "--master_port",
        "21234",
        "--max_restarts",
        "0",
    ]
    assert p.argv[12:14] == ["-m", "megamoe.train"]
    assert flag_value(p.argv, "output_dir") == "outputs/x-1"


def test_node_plan_without_batch_rendezvous_derives_it():
    env = slurm_env(SLURM_STEP_ID=0, SLURM_NODEID=0)
    p = L.plan(FLAGS, env, hostnames=hosts)
    assert flag_value(p.argv, "master_addr") == "SH-IDCA1404-10-140-54-100"
    assert flag_value(p.argv, "master_port") == str(L.port_from_job_id(1535835))
    assert flag_value(p.argv, "node_rank") == "0"


def test_node_plan_refuses_several_tasks_per_node():
    env = slurm_env(
        SLURM_STEP_ID=0, SLURM_NODEID=0, SLURM_STEP_NUM_NODES=2, SLURM_STEP_NUM_TASKS=16
    )
    with pytest.raises(L.LaunchError, match="one task per node"):
        L.plan(FLAGS, env, hostnames=hosts)


# ---- outside Slurm ----------------------------------------------------------------------------


def test_local_plan_with_gpus():
    p = L.plan(["--num_nodes", "1", "--num_gpu_per_node", "4"], {}, cuda_devices=lambda: 8)
    assert p.mode == "local"
    assert p.argv[:8] == [
        "--nnodes",
        "1",
        "--nproc_per_node",
        "4",
        "--node_rank",
        "0",
        "--master_addr",
        "127.0.0.1",
    ]
    od = flag_value(p.train_argv, "output_dir")
    assert od.startswith("outputs/local-")


def test_local_refusals():
    with pytest.raises(L.LaunchError, match="num_nodes=2 outside Slurm"):
        L.plan(["--num_nodes", "2", "--num_gpu_per_node", "8"], {}, cuda_devices=lambda: 8)
    with pytest.raises(L.LaunchError, match="num_gpu_per_node=8 but this machine has 2 GPU"):
        L.plan(["--num_nodes", "1", "--num_gpu_per_node", "8"], {}, cuda_devices=lambda: 2)
    with pytest.raises(L.LaunchError, match="no CUDA GPU.*MEGAMOE_ALLOW_CPU=1"):
        L.plan(["--num_nodes", "1", "--num_gpu_per_node", "2"], {}, cuda_devices=lambda: 0)


def test_local_cpu_allowed():
    p = L.plan(
        ["--num_gpu_per_node", "2"],
        {"MEGAMOE_ALLOW_CPU": "1", "MASTER_PORT": "29999"},
        cuda_devices=lambda: 0,
    )
    assert flag_value(p.argv, "nproc_per_node") == "2"
    assert flag_value(p.argv, "master_port") == "29999"
    assert flag_value(p.train_argv, "num_nodes") == "1"


# ---- the shell wrapper ------------------------------------------------------------------------


def test_launch_sh_refusal_message_and_exit_code():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURM_JOB_ID="77",
        SLURM_JOB_NAME="t",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="localhost",
        MEGAMOE_ALLOW_CPU="1",
        MEGAMOE_PYTHON=sys.executable,
    )
    r = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "scripts", "launch.sh"),
            "--num_nodes",
            "2",
            "--num_gpu_per_node",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "num_nodes=2 but the job has 1 node(s)" in r.stderr
    assert "set num_nodes=1 in the script, or #SBATCH --nodes=2" in r.stderr


def test_training_finished_from_checkpoint_meta(tmp_path):
    import json

    from megamoe.checkpoint import make_meta
    from megamoe.config import ModelConfig

    for step in (10, 20):
        ck = tmp_path / f"checkpoint-{step}"
        ck.mkdir()
        (ck / "megamoe.json").write_text(
            json.dumps(make_meta(ModelConfig(), None, step=step, max_steps=20))
        )
        assert training_finished(str(tmp_path)) == (step == 20)
    (tmp_path / "checkpoint-30.tmp-5").mkdir()  # an unfinished save is not a checkpoint
    assert training_finished(str(tmp_path))


@pytest.mark.parametrize("script", ["start_local_slurm.sh", "multinode_slurm.sh"])
def test_test_clusters_size_nodes_by_cpus_not_omp_threads(script):
    """The Slurm test clusters give each node the machine's CPUs: with OMP_NUM_THREADS=1 in the
    caller's environment (plain nproc would then say 1), jobs asking for 2 CPUs must still fit."""
    path = os.path.join(ROOT, "scripts", "slurm", script)
    lines = [ln for ln in open(path) if ln.startswith("node_cpus()")]
    assert len(lines) == 1, f"{script} sizes its nodes with one node_cpus() function"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"}
    out = subprocess.run(
        ["bash", "-c", lines[0] + "node_cpus"], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout) == len(os.sched_getaffinity(0))
    assert "$(nproc)" not in open(path).read()
