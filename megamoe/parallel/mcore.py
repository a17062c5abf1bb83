"""The one module that imports megatron-core (pinned 0.16.1).

Everything else in megamoe imports megatron-core's names from here, so that an upgrade of
megatron-core means reading and fixing this file (and cpu_compat.py, its CPU shim) only.
Importing this module applies the CPU shim when CUDA is absent.
"""

from __future__ import annotations

import warnings

# megatron-core warns about missing apex/TE/flash-attn at import; those are optional for us.
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402,F401

# The streaming converter (megamoe/formats/mcore_stream.py): the torch_dist save strategy it extends.
from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: E402,F401

# The trainer (megamoe/train/optim.py): megatron-core's optimizers and checkpoint factories.
from megatron.core.dist_checkpointing.mapping import (  # noqa: E402,F401
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,  # noqa: E402,F401
    apply_factories,
)
from megatron.core.dist_checkpointing.strategies import torch as torch_dist_strategy  # noqa: E402,F401
from megatron.core.distributed import (  # noqa: E402,F401
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,  # noqa: E402,F401
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add  # noqa: E402,F401
from megatron.core.models.common.embeddings import rope_utils as _rope_utils  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402,F401
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402,F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402,F401
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402,F401
from megatron.core.tensor_parallel.mappings import (  # noqa: E402,F401
    all_to_all,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402,F401
from megatron.core.transformer import TransformerConfig  # noqa: E402,F401
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules  # noqa: E402,F401
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402,F401
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402,F401
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: E402,F401
from megatron.core.transformer.module import MegatronModule  # noqa: E402,F401
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402,F401
from megatron.core.transformer.transformer_block import (  # noqa: E402,F401
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (  # noqa: E402,F401
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,  # noqa: E402,F401
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint  # noqa: E402,F401


def fix_fully_reshardable_load(optimizers) -> None:
    """Work around megatron-core 0.16.1 loading a fully_reshardable distributed-optimizer
    checkpoint into torch's Adam/AdamW (no Apex/TE FusedAdam, as on our machines).

    DistributedOptimizer.load_parameter_state_from_fully_reshardable leaves Adam's "step" out of
    the loaded tensors (load_state_dict restores it from the param groups), but
    _set_main_param_and_optimizer_states then copies every key of the live state, which has
    "step": KeyError: 'step' (seen on an H200, 2026-11-29). Skip "step" when the loaded tensors
    lack it; everything else is megatron-core's code (the other formats are unaffected). Applied to
    each DistributedOptimizer in `optimizers` (a chain's members) that is not precision-aware (that
    branch is unchanged).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in optimizers:
        if (
            not isinstance(opt, DistributedOptimizer)
            or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        ):
            continue

        def set_states(model_param, tensors, opt=opt):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            for key, dst in {"param": main_param, **opt.optimizer.state[main_param]}.items():
                if key == "step" and key not in tensors:
                    continue  # restored from the param groups by load_state_dict
                dst.copy_(tensors[key])

        opt._set_main_param_and_optimizer_states = set_states


# The rotary embedding's plain maths (megamoe/model/fusion.py compiles them).
unfused_rotary = _rope_utils._apply_rotary_pos_emb_bshd
rotate_half = _rope_utils._rotate_half


def provide_rotary_kernel(kernel) -> None:
    """Serve megatron-core's fused-rotary hook with `kernel(t, freqs, interleaved=...)`.

    With config.apply_rope_fusion, megatron-core applies RoPE through the module-level
    `fused_apply_rotary_pos_emb` of rope_utils, which is Transformer Engine's kernel when TE is
    installed and None otherwise (the config then refuses apply_rope_fusion). Without TE, as on
    our machines, `kernel` fills that slot; TE's kernel, where present, stays."""
    if _rope_utils.fused_apply_rotary_pos_emb is None:
        _rope_utils.fused_apply_rotary_pos_emb = kernel


from . import cpu_compat  # noqa: E402

CPU_SHIM_ACTIVE = cpu_compat.apply()

ps = parallel_state

__all__ = [name for name in dir() if not name.startswith("_")]
