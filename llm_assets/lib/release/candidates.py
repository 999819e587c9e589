"""Release candidates and the rule that picks the one to release.

    >>> from llm_assets.lib.release.candidates import Candidate, pick
    >>> from llm_assets.lib.release.release import Gate
    >>> ok, bad = Gate("g", True, 1.05, 1.0), Gate("g", False, 1.05, 1.4)
    >>> found = [Candidate("quantized", "quantized_model", 150.0, 10_000, [ok]),
    ...          Candidate("distilled", "distilled_model", 240.0, 14_000, [bad]),
    ...          Candidate("pruned", "pruned_model", 190.0, 16_000, [ok])]
    >>> pick("quantized", found).name, pick("fastest_passing", found).name, pick("smallest_passing", found).name
    ('quantized', 'pruned', 'quantized')

A candidate is a model directory an asset made from the aligned model (CANDIDATES: the asset and
the file in its artifact that holds its own gate), measured by eval_report beside the others on the
same held-out data. Its gates are its own (e.g. perplexity within budget of the aligned model) and
eval_report's for it (the aligned model beats LoRA; it generates non-empty, non-looping text).
Another runtime joins by an entry in CANDIDATES and a row in eval_report's candidates.

Rules (`release_rule`):
- `quantized`: the quantized model, as before rules existed (the default);
- `fastest_passing`: the most tokens/s (eval_report, greedy, batch 1) among candidates passing every gate;
- `smallest_passing`: the fewest bytes on disk among them.
With no candidate passing, the rule's best candidate is returned anyway, so that the release step
refuses it through its failed gates (and says which).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field

from llm_assets.lib.common.settings import Settings
from llm_assets.lib.release.release import Gate

# name -> (asset, the JSON file in its artifact directory whose "gate" is the candidate's own)
CANDIDATES = {"quantized": ("quantized_model", "quantization.json"),
              "distilled": ("distilled_model", "distillation.json"),
              "pruned": ("pruned_model", "pruning.json")}
RULES = ("quantized", "fastest_passing", "smallest_passing")


class RuleSettings(Settings):
    release_rule: str = Field("quantized", description="Which candidate `release` publishes: quantized (the quantized "
                              "model: the default) | fastest_passing (most tokens/s in eval_report among the "
                              "candidates passing every gate) | smallest_passing (fewest bytes on disk among them). "
                              "The candidates are eval_report's `candidates`.")

    def validate(self) -> None:
        if self.release_rule not in RULES:
            raise ValueError(f"release_rule: must be one of {RULES} (got {self.release_rule!r})")


@dataclass(frozen=True)
class Candidate:
    name: str  # a key of CANDIDATES
    asset: str
    tokens_per_second: float
    disk_bytes: int
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.gates) and all(g.passed for g in self.gates)


def candidate(name: str, own_gate: dict, report: dict) -> Candidate:
    """A candidate from its own gate (its asset's file) and eval_report's report.json."""
    if name not in report.get("candidates", {}):
        raise ValueError(f"release_rule: eval_report did not evaluate the candidate {name!r}; add it to "
                         f"eval_report's candidates and materialize it")
    figures, evaluated = report["figures"][name], report["candidates"][name]
    return Candidate(name, CANDIDATES[name][0], figures["tokens_per_second"], figures["disk_bytes"],
                     [Gate(**own_gate), *(Gate(**g) for g in evaluated["gates"])])


def pick(rule: str, found: list[Candidate]) -> Candidate:
    """The candidate `rule` releases (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"release_rule: must be one of {RULES} (got {rule!r})")
    if not found:
        raise ValueError("no release candidate was evaluated")
    if rule == "quantized":
        return next(c for c in found if c.name == "quantized")
    rank = (lambda c: -c.tokens_per_second) if rule == "fastest_passing" else (lambda c: c.disk_bytes)
    passing = [c for c in found if c.passed]
    return min(passing or found, key=rank)
