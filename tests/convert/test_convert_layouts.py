"""A converted (world-1) checkpoint loads at TP=2, EP=2 and PP=2 and reproduces the
single-process model: logits for TP (gathered over the vocab shards) and EP, exact tensors per
pipeline stage for PP. Two gloo processes."""

import json
import socket

import torch
import torch.multiprocessing as mp

from megamoe.convert import main
from tests.convert.conftest import M, load_checkpoint, logits_of, params


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_layouts_reproduce_single_process(world1, tmp_path, hf_dir):
    from tests.convert import layout_worker

    moe_ck, dense_ck = tmp_path / "moe", tmp_path / "dense"
    assert (
        main(
            [
                "hf-to-megamoe",
                "--hf-dir",
                str(hf_dir),
                "--output",
                str(moe_ck),
                "--model-type",
                "llama_moe",
                "--num-experts",
                "4",
                "--num-selects",
                "2",
                "--split",
                "random",
                "--expert-sizes",
                "16,32,24,24",
                "--tensor-model-parallel-size",
                "2",
                "--expert-model-parallel-size",
                "2",
                "--pipeline-model-parallel-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(["hf-to-megamoe", "--hf-dir", str(hf_dir), "--output", str(dense_ck), "--no-progress"])
        == 0
    )
    tokens = torch.randint(0, M.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    moe_model, _ = load_checkpoint(moe_ck)
    ref = {
        "tokens": tokens,
        "moe_logits": logits_of(moe_model, tokens),
        "dense_logits": logits_of(load_checkpoint(dense_ck)[0], tokens),
        "moe_params": params(moe_model),
        "sizes": [16, 32, 24, 24],
    }
    torch.save(ref, tmp_path / "ref.pt")
    mp.spawn(
        layout_worker.worker,
        nprocs=2,
        join=True,
        args=(_free_port(), str(tmp_path / "ref.pt"), str(moe_ck), str(dense_ck), str(tmp_path)),
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        print(
            f"rank {r}: TP2+SP MoE rel err {res['moe_tp2_sp']['rel_err']:.2e}, "
            f"TP2 dense {res['dense_tp2']['rel_err']:.2e}, EP2 MoE {res['moe_ep2']['rel_err']:.2e}"
        )
        assert res["moe_tp2_sp"]["vocab_shard"] == [2, 16, M.vocab_size // 2]
        assert res["moe_tp2_sp"]["rel_err"] < 1e-5 and res["dense_tp2"]["rel_err"] < 1e-5
        assert res["moe_ep2"]["first_expert"] == 2 * r and res["moe_ep2"]["local_experts_equal"]
        assert res["moe_ep2"]["rel_err"] < 1e-5
        pp = res["moe_pp2"]
        assert pp["stage"] == r and pp["offset"] == r and pp["mismatched"] == []
    # the two stages together hold every tensor of the world-1 model, each exactly once
    stage0, stage1 = (set(res["moe_pp2"]["compared"]) for res in results)
    assert not stage0 & stage1 and stage0 | stage1 == set(ref["moe_params"])
    assert "embedding.word_embeddings.weight" in stage0 and "output_layer.weight" in stage1
