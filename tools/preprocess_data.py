#!/usr/bin/env python
"""Tokenize jsonl into Megatron indexed datasets (.bin/.idx); see the README, section Data.

Example (LLaMA-MoE data, one folder of jsonl per domain):
    python tools/preprocess_data.py --input data/raw/en_arxiv --json-keys content \
        --tokenizer-model llama/tokenizer.model --output-prefix data/train/en_arxiv/en_arxiv \
        --workers 8
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.preprocess import main  # noqa: E402

if __name__ == "__main__":  # the guard is required: spawned processes re-import this file
    from megamoe.lifetime import watch_over_me

    watch_over_me()  # processes it starts end with it, even on SIGKILL
    sys.exit(main())
