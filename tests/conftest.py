import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TORCH_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def world1():
    """A single-process world (gloo) with megatron-core's groups of size 1."""
    import torch.distributed as dist

    from megamoe import parallel

    if not dist.is_initialized():
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
        )
    parallel.initialize(parallel.ParallelLayout(), seed=1234)  # reuses the groups when it can
    yield


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Three domains of indexed data (train + validation), reference losses, and random tiny
    pretrained checkpoints (LLaMA-MoE 4 experts top-2, and dense LLaMA): tests/train/fixtures.py."""
    import json
    import types

    from tests.train import fixtures as F

    root = tmp_path_factory.mktemp("train-tiny")
    data = F.write_domains(str(root / "data"), n_docs=40, seed=0)
    valid = F.write_domains(str(root / "valid"), n_docs=10, seed=1)
    ref = root / "ref.json"
    ref.write_text(json.dumps({"code": 1.0, "prose": 3.0, "noise": 4.5}))
    moe = F.save_pretrained_inprocess(str(root / "pre-moe"), moe=True)
    dense = F.save_pretrained_inprocess(str(root / "pre-dense"), moe=False)
    return types.SimpleNamespace(
        root=str(root), data=data, valid=valid, ref=str(ref), moe=moe, dense=dense
    )
