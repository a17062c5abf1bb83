"""`megamoe check`: the guide's scripts as the trainer sees them, and the checklist report."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from megamoe.cli import main
from megamoe.ops import checklist as P
from megamoe.ops import script, slurm

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "16_2": "scripts/cpt/16_2/baseline_112gpus_sheared_llama_portion_fluency_sf8.sh",
    "16_4": "scripts/cpt/dynamic_data_selection/baseline_112gpus_sheared_llama_portion_fluency.sh",
    "dynamic": "scripts/cpt/dynamic_data_selection/sheared_llama_112gpus.sh",
    "lora": "scripts/cpt/lora.sh",
    "fpt": "scripts/cpt/fpt.sh",
}
DOMAINS = ["code", "prose", "noise"]


def clean_env(**kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({k: str(v) for k, v in kw.items()})
    return env


# ---- the scripts -------------------------------------------------------------------------------

# the published LLaMA-MoE recipes: (nodes x gpus, lr, bs, grad accum, block, tokens, extra flags)
RECIPES = {
    "16_2": (
        (14, 8),
        2e-4,
        8,
        4,
        4096,
        200e9,
        dict(
            num_selects=2,
            score_scale_factor=8.0,
            prob_map="sheared_llama",
            final_lr_portion=0.1,
            warmup_steps=100,
            eval_steps=340,
            save_steps=340,
            dynamic_data_selection="none",
        ),
    ),
    "16_4": (
        (14, 8),
        2e-4,
        8,
        4,
        4096,
        200e9,
        dict(
            num_selects=4,
            score_scale_factor=4.0,
            prob_map="sheared_llama",
            dynamic_data_selection="none",
        ),
    ),
    "dynamic": (
        (14, 8),
        2e-4,
        8,
        4,
        4096,
        200e9,
        dict(
            dynamic_data_selection="sheared_llama",
            prob_map="llama",
            eval_steps=170,
            warmup_steps=100,
        ),
    ),
    "lora": (
        (2, 8),
        2e-4,
        16,
        1,
        2048,
        100e9,
        dict(
            training_mode="lora",
            lora_rank=8,
            lora_alpha=32.0,
            lora_dropout=0.05,
            warmup_steps=2000,
            save_steps=1000,
            lora_targets=["q", "k", "v", "o", "gate", "up", "down"],
        ),
    ),
    "fpt": (
        (1, 8),
        1e-4,
        16,
        2,
        2048,
        100e9,
        dict(training_mode="fpt", warmup_steps=2000, save_steps=1000),
    ),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_hyperparameters_as_the_trainer_parses_them(name):
    path = ROOT / SCRIPTS[name]
    t = script.read_target(str(path), clean_env())
    assert not t.problems, t.problems
    o = script.resolve_options(t.argv)  # the trainer's own parser: every flag is known to it
    (nodes, gpus), lr, bs, ga, block, tokens, extra = RECIPES[name]
    assert (o["num_nodes"], o["num_gpu_per_node"]) == (nodes, gpus)
    assert (t.sbatch["nodes"], t.sbatch["gres"]) == (str(nodes), f"gpu:{gpus}")
    assert o["learning_rate"] == lr
    assert (o["per_device_train_batch_size"], o["gradient_accumulation_steps"]) == (bs, ga)
    assert o["block_size"] == block and o["max_tokens"] == tokens
    assert o["seed"] == 1227 and o["logging_steps"] == 5 and o["bf16"] is True
    assert o["model_type"] == "llama_moe" and o["comment"]
    for k, v in extra.items():
        assert o[k] == v, k
    # the guide's sbatch conventions and preemption
    sb = t.sbatch
    assert sb["partition"] == "MoE" and sb["ntasks-per-node"] == "1"
    assert sb["output"] == sb["error"] == "logs/%x-%j.log"
    assert sb["signal"] == "B:USR1@300" and "requeue" in sb and sb["open-mode"] == "append"
    assert re.search(r"^exec bash \"\$root/scripts/launch.sh\" \\$", path.read_text(), re.M)


def test_script_variables_are_overridable_from_the_environment():
    t = script.read_target(
        str(ROOT / SCRIPTS["fpt"]),
        clean_env(pretrained_model="/my/model", num_nodes=3, lr="5e-5", comment="my run"),
    )
    o = script.resolve_options(t.argv)
    assert o["pretrained_model"] == "/my/model" and o["num_nodes"] == 3
    assert o["learning_rate"] == 5e-5 and o["comment"] == "my run"


def test_every_script_variable_has_a_default_with_an_override():
    for rel in SCRIPTS.values():
        for line in (ROOT / rel).read_text().splitlines():
            m = re.match(r"^([a-z_0-9]+)=(.*)$", line)
            if m and m.group(1) != "root":  # root: MEGAMOE_ROOT or the submit directory
                var, value = m.groups()
                assert value.startswith(f"${{{var}:-"), f"{rel}: {line}"


def test_parse_sbatch_header():
    text = (
        "#!/bin/bash\n# a comment\n#SBATCH --job-name=x\n#SBATCH -N 2 --gres gpu:4\n"
        "#SBATCH --requeue  # trailing comment\n#SBATCH -p MoE\n\nnum_nodes=2\n"
        "#SBATCH --nodes=9\n"
    )
    assert slurm.parse_sbatch_header(text) == {
        "job-name": "x",
        "nodes": "2",
        "gres": "gpu:4",
        "requeue": "",
        "partition": "MoE",
    }


def test_script_that_never_calls_the_launcher(tmp_path):
    s = tmp_path / "bad.sh"
    s.write_text("#!/bin/bash\n#SBATCH --nodes=1\necho hello\n")
    rep = P.check_target(str(s), clean_env())
    assert rep.errors and "never calls scripts/launch.sh" in rep.errors[0][1]


# ---- the checklist on a tiny, real setup ------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pretrained-model directory (megamoe.json only: the checks read no weights), three
    domains of training and validation data, and a sentencepiece tokenizer."""
    from megamoe.checkpoint import make_meta
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.data.indexed import IndexedDatasetWriter

    root = tmp_path_factory.mktemp("check")
    m = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    for name, moe in (
        ("moe", MoEConfig(num_experts=16, num_selects=2, score_scale_factor=8.0)),
        ("dense", None),
    ):
        (root / name).mkdir()
        (root / name / "megamoe.json").write_text(json.dumps(make_meta(m, moe)))
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for dom in DOMAINS:
            w = IndexedDatasetWriter(str(root / split / dom / f"{dom}_text_document"), np.uint16)
            for _ in range(5):  # 5 x 1000 tokens: more than one block of the scripts' 4096
                w.add_document(rng.integers(3, 128, size=1000))
            w.finalize()
    import sentencepiece as spm

    words = ["".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(2 + i % 6)) for i in range(300)]
    spm.SentencePieceTrainer.train(  # the model's 128 tokens (the check compares the sizes)
        sentence_iterator=iter([" ".join(words[i : i + 20]) for i in range(0, 300, 3)] * 5),
        model_prefix=str(root / "tok"),
        vocab_size=128,
        model_type="bpe",
        minloglevel=2,
    )
    return root


def script_env(setup, **kw):
    v = dict(
        pretrained_model=setup / "moe",
        tokenizer_model=setup / "tok.model",
        dataset_dir=setup / "train",
        validation_dir=setup / "valid",
        prob_map="uniform",
    )
    v.update(kw)
    return clean_env(**v)


def items(rep):
    return {k: rep.status(k) for k in rep.items}


def test_good_script_passes(setup):
    rep = P.check_target(str(ROOT / SCRIPTS["16_2"]), script_env(setup))
    assert not rep.errors, rep.render()
    assert set(P.CHECKLIST) <= set(rep.items)
    text = rep.render()
    assert "moe_calculator_score_scale_factor=8 = #experts/#selected = 16/2" in text
    assert "global batch size 3584 = 8 x 4 x 14 x 8; #tokens/batch 14680064" in text
    assert "num_selects=2 of 16 experts" in text
    assert "14 node(s) x 8 GPUs = 112" in text
    assert "3 domains code, noise, prose; prob_map uniform" in text
    assert "GiB per GPU before activations" in text  # megamoe/memory.py for this layout


@pytest.mark.parametrize(
    "override,item,status,words",
    [
        (dict(scale_factor=4.0), "scale factor", P.WARN, "is not #experts / #selected = 16/2 = 8"),
        (
            dict(num_selects=17),
            "number of selected experts",
            P.ERROR,
            "--num_selects 17 must be between 1 and the number of experts 16",
        ),
        (dict(gate_balance_loss_weight=0), "balance loss weight", P.WARN, "no balance loss"),
        (dict(gate_balance_loss_weight=-1), "balance loss weight", P.ERROR, "must be >= 0"),
        (dict(lr=0.01), "learning rate", P.WARN, "is high for continual pre-training"),
        (dict(lr=0), "learning rate", P.ERROR, "must be a positive number"),
        (dict(warmup_steps=0), "warmup steps", P.WARN, "full learning rate"),
        (dict(warmup_steps=10**6), "warmup steps", P.WARN, "never leaves the warmup"),
        (dict(eval_steps=0), "evaluation steps", P.WARN, "evaluated only at the end"),
        (dict(logging_steps=0), "logging steps", P.ERROR, "--logging_steps 0 must be at least 1"),
        (dict(logging_steps=500), "logging steps", P.WARN, "larger than eval_steps=340"),
        (
            dict(per_device_train_batch_size=0),
            "global batch size",
            P.ERROR,
            "--per_device_train_batch_size 0 must be at least 1",
        ),
        (dict(pretrained_model="/nonexistent"), "pretrained model", P.ERROR, "no such directory"),
        (dict(model_type="llama"), "pretrained model", P.ERROR, "is a LLaMA-MoE model"),
        (dict(dataset_dir="/nonexistent"), "data path", P.ERROR, "dataset directory not found"),
        (dict(prob_map="sheared_llama"), "data path", P.ERROR, "prob_map"),
        (dict(validation_dir="/nonexistent"), "data path", P.ERROR, "validation directory"),
        (
            dict(num_nodes=2),
            "GPUs",
            P.ERROR,
            "num_nodes=2 but the job has 14 node(s) (#SBATCH --nodes=14)",
        ),
        (
            dict(num_gpu_per_node=4),
            "GPUs",
            P.ERROR,
            "num_gpu_per_node=4 but the job has 8 GPU(s) per node (#SBATCH --gres=gpu:8)",
        ),
        (dict(tensor_model_parallel_size=3), "GPUs", P.ERROR, "not divisible"),
        (dict(expert_model_parallel_size=16), "GPUs", P.WARN, "all-to-all crosses nodes"),
        (
            dict(tensor_model_parallel_size=2, expert_model_parallel_size=8),
            "GPUs",
            P.WARN,
            "--expert_model_parallel_size 8 x --tensor_model_parallel_size 2 > 8 GPUs per node",
        ),
        (dict(comment=" "), "comment", P.WARN, "no comment"),
    ],
)
def test_checklist_items(setup, override, item, status, words):
    rep = P.check_target(str(ROOT / SCRIPTS["16_2"]), script_env(setup, **override))
    assert rep.status(item) == status, rep.render()
    assert any(words in f.message for f in rep.items[item]), rep.render()


def test_dense_model_for_moe_and_the_other_way(setup):
    rep = P.check_target(
        str(ROOT / SCRIPTS["fpt"]), script_env(setup, pretrained_model=setup / "dense")
    )
    assert rep.status("pretrained model") == P.ERROR
    assert "is a dense megamoe checkpoint" in rep.render()
    rep = P.check_target(
        str(ROOT / SCRIPTS["fpt"]),
        script_env(setup, pretrained_model=setup / "dense", model_type="llama"),
    )
    assert rep.status("pretrained model") == P.OK, rep.render()
    assert rep.status("scale factor") == P.OK and "not used" in rep.render()


def test_slurm_header_warnings(setup, tmp_path):
    text = (ROOT / SCRIPTS["fpt"]).read_text()
    text = text.replace("#SBATCH --signal=B:USR1@300\n", "").replace("#SBATCH --requeue\n", "")
    text = text.replace("#SBATCH --ntasks-per-node=1", "#SBATCH --ntasks-per-node=8")
    text = text.replace('exec bash "$root/scripts/launch.sh"', 'bash "$root/scripts/launch.sh"')
    s = tmp_path / "edited.sh"
    s.write_text(text)
    rep = P.check_target(str(s), script_env(setup))
    msgs = " | ".join(f.message for f in rep.items["slurm"])
    assert "no --signal" in msgs and "no --requeue" in msgs and "not started with `exec`" in msgs
    assert "--ntasks-per-node=8: always set it to 1" in rep.render()


def test_config_file(setup, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
train: {{model_type: llama_moe, pretrained_model: {setup / "moe"}, output_dir: {tmp_path / "out"},
        max_steps: 100, comment: yaml run, tokenizer_model: {setup / "tok.model"}}}
data: {{dataset_dir: {setup / "train"}, validation_dir: {setup / "valid"}, block_size: 32}}
moe: {{num_selects: 4}}
optim: {{learning_rate: 1.0e-4, warmup_steps: 10}}
num_nodes: 1
num_gpu_per_node: 2
eval_steps: 20
""")
    rep = P.check_target(str(cfg))
    assert not rep.errors, rep.render()
    assert "global batch size 16 = 8 x 1 x 1 x 2" in rep.render()
    assert rep.status("scale factor") == P.WARN  # the checkpoint's SF 8 is not 16/4
    assert "slurm" not in rep.items
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_selectz": 4}))
    rep = P.check_target(str(bad))
    assert rep.errors and "num_selectz" in rep.errors[0][1]


def test_unknown_flag_is_reported(tmp_path):
    rep = P.check_run(["--no_such_flag", "1"])
    assert rep.errors[0][0] == "flags" and "--no_such_flag" in rep.errors[0][1]


def test_cli_exit_codes_and_output(setup, capsys, monkeypatch):
    for k, v in script_env(setup).items():
        monkeypatch.setenv(k, v)
    assert main(["check", str(ROOT / SCRIPTS["16_2"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pre-flight check: ")
    for item in P.CHECKLIST:
        assert re.search(rf"^\[.\] {re.escape(item)} ", out, re.M), item
    assert re.search(r"^0 error\(s\), \d+ warning\(s\)$", out, re.M)
    monkeypatch.setenv("num_nodes", "3")
    assert main(["check", str(ROOT / SCRIPTS["16_2"])]) == 1
    assert "[E] GPUs" in capsys.readouterr().out
    assert main(["check", "/nonexistent.sh"]) == 2


def test_estimate_from_a_script(capsys, monkeypatch):
    monkeypatch.delenv("max_tokens", raising=False)
    assert main(["estimate", str(ROOT / SCRIPTS["16_2"]), "--seconds_per_step", "30"]) == 0
    out = capsys.readouterr().out
    steps = int(200e9 // (3584 * 4096))
    assert f"max_steps: {steps}\nglobal batch size: 3584\n#tokens/batch: 14680064\n" in out
    assert "wall time:" in out and "GPU-hours" in out
