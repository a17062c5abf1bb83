"""Per-domain validation sets in both supported layouts."""

import numpy as np
import pytest
import torch

from megamoe.data.valid_data import load_validation_sets


def test_both_layouts_in_order_and_truncated(tmp_path, helpers):
    v = tmp_path / "valid"
    # folder layout (what preprocess_data.py --domain-folders writes), two datasets
    s1 = helpers.write_stream_dataset(v / "en_cc" / "a_text_document", 0, [30, 30])
    helpers.write_stream_dataset(v / "en_cc" / "b_text_document", len(s1), [45])
    # Megatron-style flat layout: --output-prefix valid/en_arxiv with key "content"
    helpers.write_stream_dataset(v / "en_arxiv_content_document", 500, [33, 9])
    sets = load_validation_sets(str(v), 8)
    assert list(sets) == ["en_arxiv", "en_cc"]
    assert sets["en_cc"].shape == (105 // 8, 8) and sets["en_cc"].dtype == torch.int64
    np.testing.assert_array_equal(sets["en_cc"].flatten().numpy(), np.arange(105 // 8 * 8))
    np.testing.assert_array_equal(sets["en_arxiv"].flatten().numpy(), np.arange(500, 540))
    few = load_validation_sets(str(v), 8, max_blocks_per_domain=2, domains=["en_cc", "en_arxiv"])
    assert list(few) == ["en_cc", "en_arxiv"] and few["en_cc"].shape == (2, 8)


def test_domains_must_match(tmp_path, helpers):
    v = tmp_path / "valid"
    helpers.write_stream_dataset(v / "en_cc" / "x_text_document", 0, [30])
    with pytest.raises(ValueError, match=r"missing \['github'\]"):
        load_validation_sets(str(v), 8, domains=["en_cc", "github"])
    with pytest.raises(ValueError, match="too small"):
        load_validation_sets(str(v), 64)
    with pytest.raises(ValueError, match="holds no validation sets"):
        load_validation_sets(str(tmp_path), 8)
