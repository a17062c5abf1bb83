"""The CPU shim must match the pinned megatron-core: fail loudly when an upgrade moves a symbol."""

import importlib

import pytest
import torch

from megamoe.parallel import cpu_compat


def test_pinned_megatron_core_version():
    from importlib.metadata import version

    assert version("megatron-core") == "0.16.1", "cpu_compat.py is written for megatron-core 0.16.1"


def test_every_patch_target_exists():
    assert cpu_compat.check_patch_targets() == []


def test_shim_active_without_cuda_and_scoped_to_megatron():
    import megamoe.parallel.mcore  # noqa: F401  (applies the shim)

    if torch.cuda.is_available():
        pytest.skip("the shim is only applied without CUDA")
    assert cpu_compat.is_active()
    rope = importlib.import_module("megatron.core.models.common.embeddings.rotary_pos_embedding")
    assert rope.torch is cpu_compat.CPU_TORCH
    assert rope.torch.cuda.current_device() == torch.device("cpu")
    assert rope.torch.zeros(2, device="cuda").device.type == "cpu"
    # the real torch module (what every other library sees) is untouched
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_check_reports_missing_symbols(monkeypatch):
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    monkeypatch.delattr(random, "_get_cuda_rng_state")
    problems = cpu_compat.check_patch_targets()
    assert any("_get_cuda_rng_state" in p for p in problems)


def test_rng_tracker_forks_on_cpu(world1):
    from megamoe import parallel

    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    with parallel.rng_fork():
        inside = torch.rand(3)
    after = torch.rand(3)
    assert not torch.equal(inside, before)  # the model-parallel stream is another stream
    assert torch.equal(after, before)  # and the default stream resumes where it was
