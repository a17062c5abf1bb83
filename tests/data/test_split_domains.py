"""tools/split_domains.py: SlimPajama records into domain folders."""

import gzip
import json
import os

import pytest

from megamoe.data.split_domains import DEFAULT_MAPPING, SplitError, split_domains
from megamoe.data.split_domains import run as main


def slimpajama(n, seed=0):
    sets = sorted(DEFAULT_MAPPING)
    return [
        {"text": f"document {seed}-{i} ✓", "meta": {"redpajama_set_name": sets[i % 7]}}
        for i in range(n)
    ]


def visible(path):
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def lines(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rb") as f:
        return f.read().decode().splitlines()


def test_default_mapping_and_chunk_names(tmp_path, helpers):
    raw = tmp_path / "train"
    recs1, recs2 = slimpajama(30, 1), slimpajama(20, 2)
    # SlimPajama repeats file names across chunk folders; the outputs must not collide
    helpers.write_jsonl(raw / "chunk1" / "example_train_0.jsonl", recs1)
    helpers.write_jsonl(raw / "chunk2" / "example_train_0.jsonl.gz", recs2, compress=True)
    out = tmp_path / "domains"
    assert main(["--input", str(raw), "--output-dir", str(out)]) == 0
    assert visible(out) == sorted(DEFAULT_MAPPING.values())
    assert sorted(os.listdir(out / "en_arxiv")) == [
        "chunk1_example_train_0.jsonl",
        "chunk2_example_train_0.jsonl",
    ]
    total = 0
    for value, domain in DEFAULT_MAPPING.items():
        for f in os.listdir(out / domain):
            for line in lines(str(out / domain / f)):
                assert json.loads(line)["meta"]["redpajama_set_name"] == value
                total += 1
    assert total == 50
    # lines are copied byte for byte (ensure_ascii=False text survives unchanged)
    assert lines(str(out / "en_arxiv" / "chunk1_example_train_0.jsonl"))[0] == json.dumps(
        recs1[0], ensure_ascii=False
    )


def test_custom_key_mapping_and_unknown_values(tmp_path, helpers):
    recs = [{"content": str(i), "src": {"name": n}} for i, n in enumerate(["A", "B", "A", "Z"])]
    inp = helpers.write_jsonl(tmp_path / "x.jsonl", recs)
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"A": "dom_a", "B": "dom_b"}))
    args = ["--input", inp, "--key", "src.name", "--mapping", str(mapping)]
    with pytest.raises(SplitError, match=r"x\.jsonl:4: src\.name = 'Z' is not in the mapping"):
        main(args + ["--output-dir", str(tmp_path / "o1")])
    assert os.listdir(tmp_path / "o1") == []  # nothing half-written, not even the mark
    main(args + ["--output-dir", str(tmp_path / "o2"), "--unknown", "skip", "--compress"])
    assert visible(tmp_path / "o2") == ["dom_a", "dom_b"]
    assert len(lines(str(tmp_path / "o2" / "dom_a" / "x.jsonl.gz"))) == 2
    counts = split_domains(inp, str(tmp_path / "o3"), "src.name", {"A": "dom_a"}, unknown="keep")
    assert counts == {"dom_a": 2, "B": 1, "Z": 1}


def test_bad_lines(tmp_path, helpers):
    recs = slimpajama(5) + ["{broken", {"meta": {}}]
    inp = helpers.write_jsonl(tmp_path / "r.jsonl", recs)
    with pytest.raises(SplitError, match=r"r\.jsonl:6: .*--skip-bad-lines"):
        split_domains(inp, str(tmp_path / "o"))
    counts = split_domains(inp, str(tmp_path / "o"), skip_bad_lines=True)
    assert counts["(bad lines)"] == 2 and sum(v for k, v in counts.items() if k[0] != "(") == 5


def test_pipeline_split_preprocess_train(tmp_path, helpers, sp_model):
    """SlimPajama dump -> domain folders -> indexed datasets -> batches with a preset prob_map."""
    from megamoe.data.domains import DOMAINS
    from megamoe.data.preprocess import main as preprocess_main
    from megamoe.data.sampler import DomainSampler
    from megamoe.data.train_data import MultiDomainTrainData

    texts = helpers.make_texts(140, seed=3)
    recs = [dict(r, text=t) for r, t in zip(slimpajama(140), texts)]
    helpers.write_jsonl(tmp_path / "dump" / "part.jsonl", recs)
    main(["--input", str(tmp_path / "dump"), "--output-dir", str(tmp_path / "raw")])
    preprocess_main(
        [
            "--input",
            str(tmp_path / "raw"),
            "--domain-folders",
            "--output-prefix",
            str(tmp_path / "train"),
            "--tokenizer-model",
            sp_model,
            "--no-progress",
        ]
    )
    s = DomainSampler(DOMAINS, "sheared_llama", rule="sheared_llama", seed=1227)
    data = MultiDomainTrainData(str(tmp_path / "train"), 64, s, seed=1227)
    tok, dom = data.next_batch(8)
    assert tok.shape == (8, 64) and dom.max() < 7
