"""The release rule: which candidate is published, from each one's gates and eval_report's figures."""

import pytest

from llm_assets.lib.release.candidates import CANDIDATES, Candidate, RuleSettings, candidate, pick
from llm_assets.lib.release.release import Gate

OK, BAD = Gate("own", True, 1.5, 1.2), Gate("own", False, 1.5, 1.9)


def test_each_rule_picks_among_the_candidates_that_pass():
    quantized = Candidate("quantized", "quantized_model", 150.0, 10_000, [OK])
    distilled = Candidate("distilled", "distilled_model", 300.0, 8_000, [BAD])  # fastest and smallest, but failing
    pruned = Candidate("pruned", "pruned_model", 200.0, 16_000, [OK])
    found = [quantized, distilled, pruned]
    assert pick("quantized", found) is quantized  # the default: as before rules existed, gates or not
    assert pick("fastest_passing", found) is pruned
    assert pick("smallest_passing", found) is quantized
    assert pick("fastest_passing", [distilled, Candidate("pruned", "pruned_model", 200.0, 1, [])]) is distilled
    assert not Candidate("pruned", "pruned_model", 1.0, 1, []).passed  # no gate is no pass


def test_a_candidate_is_its_own_gate_and_eval_reports_gates_for_it():
    report = {"figures": {"pruned": {"tokens_per_second": 210.0, "disk_bytes": 123}},
              "candidates": {"pruned": {"gates": [{"name": "generation_non_empty", "passed": True, "threshold": 0,
                                                   "observed": 0, "rule": "r"}]}}}
    c = candidate("pruned", {"name": "pruned_perplexity_within_budget", "passed": True, "threshold": 1.5,
                             "observed": 1.1, "rule": "r"}, report)
    assert (c.asset, c.tokens_per_second, c.disk_bytes) == (CANDIDATES["pruned"][0], 210.0, 123)
    assert [g.name for g in c.gates] == ["pruned_perplexity_within_budget", "generation_non_empty"] and c.passed
    with pytest.raises(ValueError, match="did not evaluate the candidate 'distilled'"):
        candidate("distilled", {}, report)


def test_an_unknown_rule_is_named():
    with pytest.raises(ValueError, match="release_rule"):
        RuleSettings(release_rule="cheapest").validate()
    with pytest.raises(ValueError, match="release_rule"):
        pick("cheapest", [])
