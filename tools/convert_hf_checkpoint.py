#!/usr/bin/env python
"""Convert checkpoints between Hugging Face LLaMA / LLaMA-MoE and megamoe (see the README, section Checkpoints).

    # dense LLaMA -> LLaMA-MoE, 16 experts, top-4, random split (as the released models)
    python tools/convert_hf_checkpoint.py hf-to-megamoe --hf-dir llama-2-7b-hf \
        --output ckpt/llama2_7B-16Select4 --model-type llama_moe --num-experts 16 \
        --num-selects 4 --split random --split-seed 0
    # trained megamoe checkpoint -> HF LLaMA-MoE (safetensors, sharded above 5GB)
    python tools/convert_hf_checkpoint.py megamoe-to-hf --checkpoint outputs/run/checkpoint-1000 \
        --output hf/llama-moe-3.5B --format llama_moe --tokenizer llama-2-7b-hf

Runs on one process without a GPU, a layer at a time (memory: about one layer, plus the output
shard for megamoe-to-hf); the checkpoint it writes loads at any TP/PP/EP layout.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from megamoe.convert import main  # noqa: E402

if __name__ == "__main__":  # the guard is required: code that spawns processes re-imports this
    from megamoe.lifetime import watch_over_me

    watch_over_me()  # processes it starts end with it, even on SIGKILL
    sys.exit(main())
