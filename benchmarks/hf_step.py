"""Full training steps of two Hugging Face baselines at benchmarks/train_step.py's shapes.

    python benchmarks/hf_step.py                      # hf-dense, hf-moe4, hf-moe2; 4 layers
    python benchmarks/hf_step.py --models hf-moe4 --layers 8 --json hf.json

hf-dense is transformers' LlamaForCausalLM; hf-moe4 / hf-moe2 are the published LLaMA-MoE training
code (LlamaMoEForCausalLM of github.com/pjlab-sys4nlp/llama-moe at b17aff4,
smoe/models/llama_moe/modeling_llama_moe.py: the class its continual pre-training, cpt_fpt.py,
trains). That code is not ours and is never committed here: the user keeps an unmodified copy of
the files it imports, at their repository paths, under --llama-moe-code (default .hf_ref/llama_moe,
git-ignored): LICENSE, smoe/{,models/,modules/,modules/moe/,utils/}__init__.py,
smoe/models/llama_moe/{__init__,configuration_llama_moe,modeling_llama_moe}.py,
smoe/modules/{norm,flash_attn}.py, smoe/modules/moe/moe_{layers,gates,calculators,experts}.py and
smoe/utils/debugging.py. This script imports and runs that copy on purpose, to time it.

It subclasses the LLaMA classes of transformers 4.31-4.34 (LlamaDecoderLayer(config),
LlamaModel._prepare_decoder_attention_mask; both gone in 4.35), so this needs transformers 4.34.1
(the wheels in .whl/). Nothing of it is edited; at import time this script only supplies modules it
imports but the timed path never calls (deepspeed's gumbel_rsample, for the Switch gate; debugpy)
when they are not installed. Attention is the one the published training used for both model
types: smoe.modules.flash_attn.replace_xformers, flash-attn's flash_attn_func (causal); where
flash-attn is not installed, torch SDPA stands in for flash_attn_func (its flash kernel on Hopper),
so the dense model gets SDPA as attn_implementation="sdpa" would give it in newer transformers.

Each step: AdamW (lr 1e-5; fused on CUDA), bf16 parameters, gradients and Adam state (fp32 on CPU),
no activation recomputation, fresh random tokens (labels = inputs; the model shifts them), loss =
cross entropy (+ the gates' balance loss for the MoE). Throughput is tokens/s on one GPU over the
timed steps (median); MFU counts the activated parameters with megamoe.train.flops, as
train_step.py does, against 989 TFLOP/s (H100/H200 bf16 dense peak).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import sys
import time
import types
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.train_step import add_shape_args, model_config  # noqa: E402  (after the path)
from megamoe.config import MoEConfig  # noqa: E402
from megamoe.formats.hf_config import llama_config_dict, llama_moe_config_dict  # noqa: E402
from megamoe.train.flops import flops_per_token, peak_flops  # noqa: E402

MODELS = {"hf-dense": None, "hf-moe4": 4, "hf-moe2": 2}  # name: selected experts (None: dense)

# The published model's MoE settings are megamoe's MoEConfig defaults (config.py): the released
# LLaMA-MoE-3.5B's TopKBalancedNoisyGate with an mlp gate network, softmax scores, balance loss
# weight 1e-2, noise epsilon 1e-2, and score_scale_factor num_experts / num_selects (4.0 for 4/16,
# 8.0 for the 2/16 run). formats/hf_config.py writes them as the released config.json does.


def configs(args, name: str):
    """(ModelConfig, MoEConfig or None) of model `name` at the flags' shapes."""
    k = MODELS[name]
    return model_config(args), None if k is None else MoEConfig(
        num_experts=args.experts, num_selects=k
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    add_shape_args(ap, layers=4)
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator)")
    ap.add_argument(
        "--llama-moe-code",
        default=".hf_ref/llama_moe",
        help="the user's copy of the published LLaMA-MoE files (see above)",
    )
    ap.add_argument("--json", help="write the result rows to this file")
    return ap.parse_args(argv)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash-attn's flash_attn_func on torch SDPA: (batch, seq, heads, dim) in and out."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout_p,
        is_causal=causal,
        scale=softmax_scale,
    )
    return out.transpose(1, 2)


def _provide(name: str, **attrs):
    """A stand-in for module `name` (and its parents) unless the real one is installed."""
    if importlib.util.find_spec(name.split(".")[0]) is not None:
        return
    parts = name.split(".")
    for i in range(len(parts)):
        mod = types.ModuleType(".".join(parts[: i + 1]))
        mod.__spec__ = importlib.util.spec_from_loader(mod.__name__, loader=None)  # for find_spec
        sys.modules.setdefault(mod.__name__, mod)
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


def _unused(*_a, **_k):
    raise NotImplementedError("a stand-in: not on the benchmarked path")


def load_published(code_dir: str) -> types.SimpleNamespace:
    """LlamaMoEConfig, LlamaMoEForCausalLM and replace_xformers from the user's copy."""
    if not os.path.isfile(os.path.join(code_dir, "smoe/models/llama_moe/modeling_llama_moe.py")):
        sys.exit(f"no published LLaMA-MoE code under {code_dir} (see --help)")
    import transformers  # noqa: F401  (first: its optional-package probes see the real ones)

    _provide("deepspeed.moe.sharded_moe", gumbel_rsample=_unused)  # moe_gates.py (Switch gate)
    _provide("debugpy")  # smoe/utils/debugging.py (remote_breakpoint, a debugging aid)
    _provide("flash_attn", flash_attn_func=_flash_attn_func)  # smoe/modules/flash_attn.py
    sys.path.insert(0, os.path.abspath(code_dir))
    return types.SimpleNamespace(
        config=importlib.import_module("smoe.models.llama_moe.configuration_llama_moe"),
        modeling=importlib.import_module("smoe.models.llama_moe.modeling_llama_moe"),
        attention=importlib.import_module("smoe.modules.flash_attn"),
    )


def published_attention(model, published) -> None:
    """The published training's attention patch (cpt_fpt.py applies it to every model type)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    published.attention.replace_xformers(model)
    # transformers 4.34's dense LlamaDecoderLayer passes padding_mask (None without padding),
    # which 4.31's did not and the patched forward does not take
    for m in model.modules():
        if isinstance(m, LlamaAttention):
            m.forward = lambda *a, _f=m.forward, padding_mask=None, **k: _f(*a, **k)


def build(args, name: str, published, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    m, moe = configs(args, name)
    no_cache = {"use_cache": False}  # training: no KV cache kept
    if moe is None:
        cls, cfg = LlamaForCausalLM, LlamaConfig(**llama_config_dict(m, extra=no_cache))
    else:
        cls = published.modeling.LlamaMoEForCausalLM
        cfg = published.config.LlamaMoEConfig(**llama_moe_config_dict(m, moe, extra=no_cache))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):  # built in place, in `dtype` (as from_pretrained(torch_dtype=) does)
        model = cls._from_config(cfg, torch_dtype=dtype)
    published_attention(model, published)
    return model.train()


def bench(args, name: str, published) -> dict:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build(args, name, published, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator(device=dev).manual_seed(0)

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        # fresh random tokens every step (a fixed batch gets memorised)
        mbs = [
            torch.randint(0, args.vocab, (args.micro_batch, args.seq), device=dev, generator=g)
            for _ in range(args.grad_accum)
        ]
        _sync()
        t0 = time.perf_counter()
        loss = torch.zeros((), device=dev)
        for x in mbs:
            out = model(input_ids=x, labels=x)
            (out.loss / args.grad_accum).backward()
            loss += out.loss.detach() / args.grad_accum
            del out  # (the logits)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())

    step_s = sorted(times)[len(times) // 2]
    tokens = args.micro_batch * args.seq * args.grad_accum
    m, moe = configs(args, name)
    row = dict(
        model=name,
        layers=args.layers,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        tokens_per_step=tokens,
        step_ms=1e3 * step_s,
        tokens_per_s_per_gpu=tokens / step_s,
        mfu=flops_per_token(m, moe, args.seq) * tokens / step_s / peak_flops(None)[0],
        mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        loss=losses[-1] if losses else float("nan"),
    )
    return row


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> list:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*_register_pytree_node.*")  # transformers 4.34
    import transformers
    from transformers.models.llama.modeling_llama import LlamaModel

    if not hasattr(LlamaModel, "_prepare_decoder_attention_mask"):
        sys.exit(
            f"transformers {transformers.__version__}: the published LLaMA-MoE code needs the "
            "LLaMA classes of transformers 4.31-4.34; install 4.34.1 (the wheels in .whl/)"
        )
    published = load_published(args.llama_moe_code)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("# no CUDA: a CPU smoke run (fp32); the numbers mean nothing")
    print(
        f"# {torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; hidden {args.hidden}, {args.heads} heads, "
        f"{args.layers} layers, seq {args.seq}, {args.experts} experts x "
        f"{args.ffn // args.experts}, micro-batch {args.micro_batch} x {args.grad_accum}, "
        f"{'bf16' if cuda else 'fp32'}, median of {args.steps} steps after {args.warmup}"
    )
    print(
        f"{'model':>9} {'step ms':>8} {'tok/s/GPU':>10} {'MFU':>6} {'GiB':>6} {'loss':>7}",
        flush=True,
    )
    rows = []
    free()
    for name in args.models:
        r = bench(args, name, published)
        free()  # the model, its gradients and Adam state go before the next model
        rows.append(r)
        print(
            f"{r['model']:>9} {r['step_ms']:>8.1f} {r['tokens_per_s_per_gpu']:>10,.0f} "
            f"{100 * r['mfu']:>5.1f}% {r['mem_gib']:>6.1f} {r['loss']:>7.3f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
