"""Fixtures of the conversion tests: tiny random transformers LLaMA models saved on disk as real
safetensors / .bin files, and a small Megatron indexed dataset for the data-driven splits."""

import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import hf_llama, tiny_model_config

# hidden 64, 2 layers, d_ff 96 (divisible by 2, 3, 4, 6, 8 experts), GQA 4 heads / 2 kv heads
M = tiny_model_config()


def save_bin(sd: dict, out_dir, shards: int = 1) -> None:
    """Write a state dict the way transformers 4.x did with safe_serialization=False:
    pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin plus pytorch_model.bin.index.json."""
    os.makedirs(out_dir, exist_ok=True)
    names = list(sd)
    if shards == 1:
        torch.save(
            {k: sd[k].contiguous() for k in names}, os.path.join(out_dir, "pytorch_model.bin")
        )
        return
    parts = np.array_split(np.arange(len(names)), shards)
    weight_map, total = {}, 0
    for i, idx in enumerate(parts):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {names[j]: sd[names[j]].contiguous() for j in idx}
        torch.save(part, os.path.join(out_dir, fname))
        for k, t in part.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


@pytest.fixture(scope="session")
def hf_model():
    return hf_llama(M, seed=11)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, hf_model):
    """The tiny LLaMA written by transformers' save_pretrained (model.safetensors)."""
    d = tmp_path_factory.mktemp("hf_llama")
    hf_model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """A Megatron indexed dataset (written by megamoe.data.indexed) of random tokens."""
    from megamoe.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path_factory.mktemp("data") / "sample_text_document")
    rng = np.random.default_rng(5)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for _ in range(40):
            w.add_document(rng.integers(0, M.vocab_size, size=int(rng.integers(20, 80))))
    return prefix


def logits_of(model, tokens):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)


def load_checkpoint(path):
    """Build the world-1 model a megamoe checkpoint describes and load it."""
    from megamoe import checkpoint
    from megamoe.model.llama import build_model

    meta = checkpoint.read_meta(path)
    m, moe = checkpoint.configs_from_meta(meta)
    model = build_model(m, moe).eval()
    checkpoint.load_model(path, model)
    return model, meta


def params(model) -> dict:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }
