"""Worker of test_convert_layouts (a module of its own so spawned processes can import it).

Each of 2 gloo processes loads the converted world-1 checkpoints at TP=2 (+SP), EP=2 and PP=2
and reports, as JSON, how its logits / tensors compare with the single-process reference."""

import json
import os

import torch
import torch.distributed as dist


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)


def worker(rank, port, ref_path, moe_ck, dense_ck, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    from megamoe import checkpoint, parallel
    from megamoe.model.llama import build_model
    from megamoe.parallel.mcore import get_transformer_layer_offset

    ref = torch.load(ref_path)
    tokens = ref["tokens"]
    res = {}

    def load(ck, layout):
        parallel.initialize(layout, seed=123 + rank)  # other seeds: loading must overwrite all
        m, moe = checkpoint.configs_from_meta(checkpoint.read_meta(ck))
        model = build_model(m, moe, layout=layout).eval()
        checkpoint.load_model(ck, model)
        return model

    # TP=2: vocab-parallel logits, gathered over the TP group
    for name, ck, layout in (
        (
            "moe_tp2_sp",
            moe_ck,
            parallel.ParallelLayout(tensor_model_parallel_size=2, sequence_parallel=True),
        ),
        ("dense_tp2", dense_ck, parallel.ParallelLayout(tensor_model_parallel_size=2)),
    ):
        model = load(ck, layout)
        part = _logits(model, tokens)
        parts = [torch.empty_like(part) for _ in range(2)]
        dist.all_gather(parts, part.contiguous(), group=parallel.tp_group())
        full = torch.cat(parts, dim=-1)
        key = "moe_logits" if ck == moe_ck else "dense_logits"
        res[name] = {"vocab_shard": list(part.shape), "rel_err": _rel(full, ref[key])}

    # EP=2: two experts per rank; every rank computes full logits for the same tokens
    layout = parallel.ParallelLayout(expert_model_parallel_size=2)
    model = load(moe_ck, layout)
    ex = model.decoder.layers[0].mlp.experts
    full_gate = ref["moe_params"]["decoder.layers.0.mlp.experts.weight_gate"]
    start = sum(ref["sizes"][: ex.first_expert])
    local = full_gate[start : start + sum(ex.sizes)]
    res["moe_ep2"] = {
        "first_expert": ex.first_expert,
        "local_experts_equal": bool(torch.equal(ex.weight_gate, local)),
        "rel_err": _rel(_logits(model, tokens), ref["moe_logits"]),
    }

    # PP=2: each stage holds exactly its layers' tensors, bit-equal to the world-1 model's
    layout = parallel.ParallelLayout(pipeline_model_parallel_size=2)
    model = load(moe_ck, layout)
    offset = get_transformer_layer_offset(model.config)
    mismatched, compared = [], []
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor) or k.endswith("_extra_state"):
            continue
        gk = k
        if k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers.") :].split(".", 1)
            gk = f"decoder.layers.{int(i) + offset}.{rest}"
        compared.append(gk)
        if gk not in ref["moe_params"] or not torch.equal(v, ref["moe_params"][gk]):
            mismatched.append(gk)
    res["moe_pp2"] = {
        "stage": parallel.pp_rank(),
        "offset": offset,
        "compared": sorted(compared),
        "mismatched": mismatched,
    }
    parallel.destroy()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
