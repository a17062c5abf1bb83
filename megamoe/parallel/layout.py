"""The TP / PP / EP layout of a run, and every rule about which layouts a model allows.

Torch-free, so that the cheap tools (`megamoe check`, the converter's argument checks) can ask
without starting anything. Experts are not tensor-parallel (megatron-core's expert TP is 1): the
E experts of a layer are sharded over the expert-parallel group, which folds over TP x DP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..findings import Finding, at_least, error


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def check_world(
        self, world_size: int | None = None, num_experts: int | None = None
    ) -> list[Finding]:
        """The rules that do not depend on the model's kind or shapes: sizes, the world size
        (None: not known here), and the expert count when one is given."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        ep = self.expert_model_parallel_size
        out: list[Finding] = []
        for knob, v in (
            ("tensor_model_parallel_size", tp),
            ("pipeline_model_parallel_size", pp),
            ("expert_model_parallel_size", ep),
        ):
            out += at_least(knob, v, 1)
        if out:
            return out
        if world_size is not None:
            if world_size % (tp * pp):
                out.append(
                    error(
                        "world_size",
                        f"the world size {world_size} is not divisible by "
                        f"--tensor_model_parallel_size {tp} x "
                        f"--pipeline_model_parallel_size {pp}",
                        "change them, or the number of processes",
                    )
                )
            elif (tp * self.data_parallel_size(world_size)) % ep:
                out.append(
                    error(
                        "expert_model_parallel_size",
                        f"{{flag}} {ep} must divide tensor "
                        f"x data parallel size {tp * self.data_parallel_size(world_size)}",
                    )
                )
        if num_experts is not None and num_experts % ep:
            out.append(
                error(
                    "expert_model_parallel_size",
                    f"{{flag}} {ep} must divide the number of experts {num_experts}",
                )
            )
        return out

    def check(
        self,
        model: ModelConfig | None = None,
        num_experts: int | None = None,
        world_size: int | None = None,
    ) -> list[Finding]:
        """Every rule a layout must meet for a model of these shapes (None: not known here),
        with `num_experts` experts per layer (None: a dense LLaMA), on `world_size` processes
        (None: not known here)."""
        out = self.check_world(world_size, num_experts)
        tp, ep = self.tensor_model_parallel_size, self.expert_model_parallel_size
        if min(tp, self.pipeline_model_parallel_size, ep) < 1:
            return out
        is_moe = num_experts is not None
        if ep > 1 and not is_moe:
            out.append(
                error("expert_model_parallel_size", "{flag} applies to llama_moe models only")
            )
        if tp > 1 and is_moe and not self.sequence_parallel:
            out.append(
                error(
                    "sequence_parallel",
                    "{flag} false: LLaMA-MoE with tensor "
                    "parallelism needs sequence parallelism (each TP rank routes its own "
                    "tokens)",
                    "leave the flag out",
                )
            )
        if model is not None:
            splits = [
                ("num_attention_heads", model.num_attention_heads, "tensor_model_parallel_size"),
                ("num_key_value_heads", model.kv_heads, "tensor_model_parallel_size"),
                ("vocab_size", model.vocab_size, "tensor_model_parallel_size"),
                ("num_hidden_layers", model.num_hidden_layers, "pipeline_model_parallel_size"),
            ]
            if not is_moe:
                splits.append(
                    ("intermediate_size", model.intermediate_size, "tensor_model_parallel_size")
                )
            for what, n, knob in splits:
                size = getattr(self, knob)
                if n % size:
                    out.append(
                        error(knob, f"{{flag}} {size} does not divide the model's {what} {n}")
                    )
        return out
