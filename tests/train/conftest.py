import json
import types

import pytest

from tests.train import fixtures as F


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Three domains of indexed data (train + validation), reference losses, and random tiny
    pretrained checkpoints (LLaMA-MoE 4 experts top-2, and dense LLaMA)."""
    root = tmp_path_factory.mktemp("train-tiny")
    data = F.write_domains(str(root / "data"), n_docs=40, seed=0)
    valid = F.write_domains(str(root / "valid"), n_docs=10, seed=1)
    ref = root / "ref.json"
    ref.write_text(json.dumps({"code": 1.0, "prose": 3.0, "noise": 4.5}))
    moe = F.save_pretrained_inprocess(str(root / "pre-moe"), moe=True)
    dense = F.save_pretrained_inprocess(str(root / "pre-dense"), moe=False)
    return types.SimpleNamespace(root=str(root), data=data, valid=valid, ref=str(ref),
                                 moe=moe, dense=dense)
