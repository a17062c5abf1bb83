"""tools/preprocess_data.py end to end with a real sentencepiece model, read back by
megatron-core; workers, keys, compression, bad input and atomic outputs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset as MCoreDataset

from megamoe.data.preprocess import PreprocessError, main
from megamoe.data.preprocess import run as preprocess_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(inputs, prefix, model, *extra):
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return preprocess_run(
        [
            "--input",
            *map(str, inputs),
            "--output-prefix",
            str(prefix),
            "--tokenizer-model",
            model,
            "--no-progress",
            *extra,
        ]
    )


def files(prefix):
    return {ext: open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx")}


@pytest.fixture
def corpus(tmp_path, helpers):
    texts = helpers.make_texts(300, seed=5)
    a = helpers.write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": t} for t in texts[:200]])
    b = helpers.write_jsonl(
        tmp_path / "in" / "b.jsonl.gz", [{"text": t} for t in texts[200:]], compress=True
    )
    return texts, [a, b]


def test_tokens_are_bos_plus_sentencepiece(corpus, tmp_path, sp_model):
    texts, inputs = corpus
    run(inputs, tmp_path / "out", sp_model, "--legacy-tokenizer")
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    ds = MCoreDataset(str(tmp_path / "out_text_document"))
    assert ds.index.dtype == np.uint16 and len(ds) == len(texts)
    for i, t in enumerate(texts):
        assert ds[i].tolist() == [sp.bos_id()] + sp.encode(t)

    run(inputs[0], tmp_path / "eod", sp_model, "--append-eod", "--legacy-tokenizer")
    ds = MCoreDataset(str(tmp_path / "eod_text_document"))
    assert ds[3].tolist() == [1] + sp.encode(texts[3]) + [2]
    run(inputs[0], tmp_path / "nobos", sp_model, "--append-eod")  # current Megatron-LM: no BOS
    ds = MCoreDataset(str(tmp_path / "nobos_text_document"))
    assert ds[3].tolist() == sp.encode(texts[3]) + [2]


def test_workers_give_identical_output(corpus, tmp_path, sp_model):
    _, inputs = corpus
    run(inputs, tmp_path / "w1", sp_model, "--batch-lines", "7")
    run(inputs, tmp_path / "w2", sp_model, "--workers", "2", "--batch-lines", "7")
    assert files(tmp_path / "w1_text_document") == files(tmp_path / "w2_text_document")


def test_content_key_and_several_keys(tmp_path, helpers, sp_model):
    recs = [
        {"content": f"doc {i} " + t, "title": t[:10]} for i, t in enumerate(helpers.make_texts(20))
    ]
    inp = helpers.write_jsonl(tmp_path / "x.jsonl", recs)
    run(inp, tmp_path / "o", sp_model, "--json-keys", "content", "title", "--legacy-tokenizer")
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    c = MCoreDataset(str(tmp_path / "o_content_document"))
    t = MCoreDataset(str(tmp_path / "o_title_document"))
    assert len(c) == len(t) == 20
    assert c[7].tolist() == [1] + sp.encode(recs[7]["content"])
    assert t[7].tolist() == [1] + sp.encode(recs[7]["title"])


def test_folder_and_glob_inputs(corpus, tmp_path, sp_model):
    _, inputs = corpus
    run(tmp_path / "in", tmp_path / "dir", sp_model)
    run(str(tmp_path / "in" / "*.jsonl*"), tmp_path / "glob", sp_model)
    run(inputs, tmp_path / "list", sp_model)
    assert (
        files(tmp_path / "dir_text_document")
        == files(tmp_path / "glob_text_document")
        == files(tmp_path / "list_text_document")
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_malformed_line_reports_file_and_line(tmp_path, helpers, sp_model, workers):
    recs = [{"text": t} for t in helpers.make_texts(40)]
    recs[22] = '{"text": "unterminated'
    inp = helpers.write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(PreprocessError, match=r"bad\.jsonl:23: malformed json.*--skip-bad-lines"):
        run(inp, tmp_path / "o", sp_model, "--workers", workers, "--batch-lines", "5")
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing written, no temporary files left
    run(inp, tmp_path / "o", sp_model, "--workers", workers, "--skip-bad-lines")
    assert len(MCoreDataset(str(tmp_path / "o_text_document"))) == 39


def test_missing_key(tmp_path, helpers, sp_model, capsys):
    recs = [{"text": t} for t in helpers.make_texts(10)]
    recs[4] = {"body": "no text key here"}
    recs[6] = {"text": ["a", "list"]}
    inp = helpers.write_jsonl(tmp_path / "k.jsonl", recs)
    with pytest.raises(PreprocessError, match=r"k\.jsonl:5: missing key 'text'"):
        run(inp, tmp_path / "o", sp_model)
    run(inp, tmp_path / "o", sp_model, "--skip-bad-lines")
    out = capsys.readouterr()
    assert "skipped 2 bad line(s)" in out.out and "k.jsonl:7: non-string value" in out.err


def test_failed_run_keeps_existing_outputs(corpus, tmp_path, helpers, sp_model):
    _, inputs = corpus
    run(inputs, tmp_path / "o", sp_model)
    before = files(tmp_path / "o_text_document")
    bad = helpers.write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}] * 600 + ["{oops"])
    with pytest.raises(PreprocessError):
        run(bad, tmp_path / "o", sp_model, "--workers", "2")
    assert files(tmp_path / "o_text_document") == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_not_a_sentencepiece_model(corpus, tmp_path):
    _, inputs = corpus
    fake = tmp_path / "tokenizer.model"
    fake.write_text("this is not a sentencepiece model")
    with pytest.raises(PreprocessError, match=r"tokenizer\.model is not a sentencepiece model"):
        run(inputs, tmp_path / "o", str(fake))
    with pytest.raises(PreprocessError, match="tokenizer model not found"):
        run(inputs, tmp_path / "o", str(tmp_path / "nope.model"))


def test_vocabulary_dtype(corpus, tmp_path, big_vocab_model):
    texts, inputs = corpus
    run(inputs[0], tmp_path / "auto", big_vocab_model)
    ds = MCoreDataset(str(tmp_path / "auto_text_document"))
    assert ds.index.dtype == np.int32 and len(ds) == 200
    with pytest.raises(PreprocessError, match="70000 tokens does not fit uint16"):
        run(inputs[0], tmp_path / "u16", big_vocab_model, "--dtype", "uint16")


def test_empty_input_and_blank_lines(tmp_path, sp_model):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(PreprocessError, match="no documents"):
        run(str(p), tmp_path / "o", sp_model)
    p.write_text('\n{"text": "a b"}\n\n{"text": "c"}\n')
    run(str(p), tmp_path / "o", sp_model)
    assert len(MCoreDataset(str(tmp_path / "o_text_document"))) == 2


def test_zst_input(tmp_path, sp_model):
    p = tmp_path / "x.jsonl.zst"
    try:
        import zstandard
    except ImportError:
        p.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(RuntimeError, match="needs the 'zstandard' package"):
            run(str(p), tmp_path / "o", sp_model)
        return
    p.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a b c"}\n'))
    run(str(p), tmp_path / "o", sp_model)
    assert len(MCoreDataset(str(tmp_path / "o_text_document"))) == 1


def test_domain_folders_layout_feeds_training_and_validation(tmp_path, helpers, sp_model):
    from megamoe.data.sampler import DomainSampler
    from megamoe.data.train_data import MultiDomainTrainData
    from megamoe.data.valid_data import load_validation_sets

    raw, val = tmp_path / "raw", tmp_path / "rawval"
    for i, d in enumerate(["en_arxiv", "github"]):
        for part in range(2):
            helpers.write_jsonl(
                raw / d / f"p{part}.jsonl",
                [{"content": t} for t in helpers.make_texts(30, seed=10 * i + part)],
            )
        helpers.write_jsonl(
            val / f"{d}.jsonl", [{"content": t} for t in helpers.make_texts(20, seed=i + 50)]
        )
    for src, dst in ((raw, "train"), (val, "valid")):
        main(
            [
                "--input",
                str(src),
                "--domain-folders",
                "--output-prefix",
                str(tmp_path / dst),
                "--json-keys",
                "content",
                "--tokenizer-model",
                sp_model,
                "--no-progress",
                "--legacy-tokenizer",
            ]
        )
    assert sorted(os.listdir(tmp_path / "train" / "github")) == [
        "github_content_document.bin",
        "github_content_document.idx",
        "github_content_document.stats.json",
    ]
    s = DomainSampler(["en_arxiv", "github"], "uniform", seed=0)
    data = MultiDomainTrainData(str(tmp_path / "train"), 32, s, seed=0)
    tok, dom = data.next_batch(4)
    assert tok.shape == (4, 32) and set(dom.tolist()) <= {0, 1}
    sets = load_validation_sets(str(tmp_path / "valid"), 32, domains=["en_arxiv", "github"])
    assert sets["github"][0, 0].item() == 1  # each validation set starts with BOS


def test_command_line_tool(corpus, tmp_path, sp_model):
    _, inputs = corpus
    tool = os.path.join(REPO, "tools", "preprocess_data.py")
    ok = subprocess.run(
        [
            sys.executable,
            tool,
            "--input",
            inputs[0],
            "--output-prefix",
            str(tmp_path / "cli"),
            "--tokenizer-model",
            sp_model,
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert ok.returncode == 0, ok.stderr
    assert "200 documents" in ok.stdout and "tokens/s" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            tool,
            "--input",
            inputs[0],
            "--output-prefix",
            str(tmp_path / "cli"),
            "--tokenizer-model",
            inputs[0],
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert bad.returncode == 2 and "is not a sentencepiece model" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_tokenizer_type_without_bos(tmp_path, helpers, sp_model):
    inp = helpers.write_jsonl(tmp_path / "x.jsonl", [{"text": "abc def"}])
    run(
        inp,
        tmp_path / "o",
        sp_model,
        "--tokenizer-type",
        "GPTSentencePieceTokenizer",
        "--append-eod",
    )
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    ds = MCoreDataset(str(tmp_path / "o_text_document"))  # keep it: its __del__ closes the mmap
    assert ds[0].tolist() == sp.encode("abc def") + [2]
