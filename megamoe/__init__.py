"""megamoe: a Megatron-style parallel trainer for LLaMA-MoE."""

__version__ = "0.1.0"
