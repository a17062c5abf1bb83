#!/usr/bin/env python
"""Split raw SlimPajama jsonl into one folder per domain (en_cc, en_c4, github, en_wikipedia,
en_book, en_arxiv, en_stack) by meta.redpajama_set_name; see the README, section Data.

Example:
    python tools/split_domains.py --input SlimPajama-627B/train --output-dir data/raw
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.split_domains import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
