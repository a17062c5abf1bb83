"""Domain presets, the update rules against a plain NumPy reference, sampling frequencies,
batch invariance and checkpoint round trips of DomainSampler."""

import json
import math

import numpy as np
import pytest

from megamoe.data.domains import DOMAINS, PROB_MAPS, REF_LOSSES, load_prob_map, load_ref_loss
from megamoe.data.sampler import DomainSampler

# chi-square(6) quantile at 0.999 (scipy.stats.chi2.ppf(0.999, 6))
CHI2_6_999 = 22.4577


def test_presets():
    assert DOMAINS == [
        "en_cc",
        "en_c4",
        "github",
        "en_wikipedia",
        "en_book",
        "en_arxiv",
        "en_stack",
    ]
    for name in ("llama", "sheared_llama"):
        assert list(PROB_MAPS[name]) == DOMAINS
        assert math.isclose(sum(PROB_MAPS[name].values()), 1.0)
    assert load_prob_map("uniform", ["a", "b", "c", "d"]) == {d: 0.25 for d in "abcd"}
    assert load_ref_loss()["en_cc"] == 1.6917 and load_ref_loss()["en_stack"] == 1.4975
    assert REF_LOSSES["sheared_llama_2.7b"]["github"] == 0.6883


def test_json_file_and_normalisation(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"b": 3, "a": 1}))
    assert load_prob_map(str(p), ["a", "b"]) == {"a": 0.25, "b": 0.75}
    p.write_text("{not json")
    with pytest.raises(ValueError, match="w.json is not valid json"):
        load_prob_map(str(p), ["a", "b"])


def test_weights_must_name_exactly_the_domains(tmp_path):
    with pytest.raises(ValueError, match=r"missing \['en_code'\], extra \['github'\]"):
        load_prob_map(
            "llama",
            ["en_cc", "en_c4", "en_code", "en_wikipedia", "en_book", "en_arxiv", "en_stack"],
        )
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        DomainSampler(["a", "b", "c"], {"a": 1, "b": 1}, seed=0)
    with pytest.raises(ValueError, match="neither a preset"):
        load_prob_map("lama", DOMAINS)
    with pytest.raises(ValueError, match=">= 0"):
        DomainSampler(["a", "b"], [1.0, -0.5], seed=0)
    with pytest.raises(ValueError, match="unknown dynamic data selection rule"):
        DomainSampler(DOMAINS, "llama", rule="doremi")


# ---- update rules: a direct transcription of the formulas, separate from the implementation ----
def ref_sheared_llama(w, losses, r, eta=1.0, c=1e-4):
    a = np.exp(np.log(w) + eta * (losses - r))
    a = a / a.sum()
    new = (1 - c) * a + c / len(w)
    return new / new.sum()


def ref_paper(w, losses, r):
    a = w * np.exp(np.maximum(0.0, losses - r))
    return a / a.sum()


@pytest.mark.parametrize(
    "rule,ref", [("sheared_llama", ref_sheared_llama), ("sheared_llama_paper", ref_paper)]
)
def test_update_rules_match_reference(rule, ref):
    rng = np.random.default_rng(7)
    r = np.array([REF_LOSSES["llama2_7b"][d] for d in DOMAINS])
    s = DomainSampler(DOMAINS, "llama", rule=rule, ref_loss="llama2_7b", seed=1)
    w = np.array([PROB_MAPS["llama"][d] for d in DOMAINS])
    for step in range(20):
        losses = r + rng.normal(0, 0.5, len(DOMAINS))
        w = ref(w, losses, r)
        got = s.update(dict(zip(DOMAINS, losses)), step=step)
        np.testing.assert_allclose(got, w, rtol=1e-12, atol=0)
        assert got.dtype == np.float64 and math.isclose(got.sum(), 1.0, rel_tol=1e-15)
    assert len(s.history) == 20 and s.history[-1]["step"] == 19
    assert s.history[-1]["weights"] == s.weights.tolist()


def test_update_rule_details():
    d = ["x", "y"]
    # losses above reference raise a domain's weight; below (paper rule) leave it alone
    s = DomainSampler(d, [0.5, 0.5], rule="sheared_llama_paper", ref_loss={"x": 1, "y": 1})
    w = s.update({"x": 2.0, "y": 0.5})
    np.testing.assert_allclose(w, [math.e / (math.e + 1), 1 / (math.e + 1)], rtol=1e-15)
    # sheared_llama keeps every domain at least c / K
    s = DomainSampler(d, [1.0, 0.0], rule="sheared_llama", ref_loss={"x": 1, "y": 1}, c=0.1)
    w = s.update({"x": 1.0, "y": 1.0})
    np.testing.assert_allclose(w, [0.95, 0.05], rtol=1e-12)
    # "none": weights unchanged, losses still recorded
    s = DomainSampler(d, [0.3, 0.7], rule="none")
    np.testing.assert_array_equal(s.update({"x": 5.0, "y": 1.0}), [0.3, 0.7])
    assert s.history[0]["losses"] == [5.0, 1.0]
    with pytest.raises(ValueError, match=r"missing \['y'\]"):
        s.update({"x": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        s.update({"x": float("nan"), "y": 1.0})


def test_sampling_frequencies_match_weights():
    """Chi-square goodness of fit with a fixed seed: fails if the sampler is off by a
    domain, ignores small weights, or is not updated by `update`."""
    n = 200_000
    s = DomainSampler(DOMAINS, "sheared_llama", rule="sheared_llama_paper", seed=1227)
    for _ in range(2):
        w = s.weights
        counts = np.bincount(s.sample(n), minlength=len(DOMAINS))
        chi2 = float(((counts - n * w) ** 2 / (n * w)).sum())
        assert chi2 < CHI2_6_999, (chi2, counts, n * w)
        s.update(
            dict(
                zip(
                    DOMAINS,
                    np.array(list(REF_LOSSES["llama2_7b"].values())) + np.linspace(0, 1.5, 7),
                )
            )
        )
        assert not np.allclose(s.weights, w)  # the second round tests the updated weights
    assert s.num_samples == 2 * n


def test_zero_weight_never_drawn():
    s = DomainSampler(["a", "b", "c"], [0.0, 1.0, 0.0], seed=3)
    assert set(s.sample(10_000).tolist()) == {1}


def test_batching_does_not_change_the_sequence():
    a = DomainSampler(DOMAINS, "llama", seed=5)
    b = DomainSampler(DOMAINS, "llama", seed=5)
    one = [a.sample() for _ in range(100)]
    many = np.concatenate([b.sample(7) for _ in range(14)] + [b.sample(2)])
    assert one == many.tolist()
    assert a.counts.tolist() == b.counts.tolist()


def test_state_dict_json_round_trip_resumes_exactly():
    def run(s, k):
        out = []
        for i in range(k):
            out += s.sample(13).tolist()
            if i % 3 == 2:
                s.update(dict(zip(DOMAINS, np.linspace(1, 2.2, 7) + 0.01 * i)), step=i)
        return out

    full = DomainSampler(DOMAINS, "llama", rule="sheared_llama", seed=11)
    expected = run(full, 10)

    first = DomainSampler(DOMAINS, "llama", rule="sheared_llama", seed=11)
    got = run(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = DomainSampler(DOMAINS, "llama", rule="sheared_llama", seed=999)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.weights, first.weights)  # bit-exact weights
    for i in range(4, 10):  # continue the same loop
        got += resumed.sample(13).tolist()
        if i % 3 == 2:
            resumed.update(dict(zip(DOMAINS, np.linspace(1, 2.2, 7) + 0.01 * i)), step=i)
    assert got == expected
    assert resumed.state_dict() == json.loads(json.dumps(full.state_dict()))


def test_load_state_for_other_domains_fails():
    s = DomainSampler(["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="state is for domains"):
        DomainSampler(["a", "c"], [1, 1]).load_state_dict(s.state_dict())
