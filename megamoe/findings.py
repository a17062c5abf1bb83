"""Structured results of a check: what is wrong with which flag, how bad it is, and what to do.

Every rule about a run is written once, as a method that returns findings (the config sections,
``MoEConfig.check``, ``ParallelLayout.check``, the trainer's plan); the trainer refuses to start
on errors, ``megamoe check`` files each finding under the checklist item of its flag, and the
converter raises on errors. A message may name its flag as ``{flag}``: each tool spells it as its
users type it (``--num_selects`` for the trainer, ``--num-selects`` for the converter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

ERROR, WARNING = "error", "warning"


# The flag of each knob whose flag is not its name (the guide's spellings; config.py fills it).
FLAG_NAMES: dict[str, str] = {}


def underscore_flag(knob: str) -> str:
    """--moe_calculator_score_scale_factor: as the guide and the trainer spell flags."""
    return "--" + FLAG_NAMES.get(knob, knob)


def dash_flag(knob: str) -> str:
    """--moe-calculator-score-scale-factor: as Megatron-style tools spell flags."""
    return underscore_flag(knob).replace("_", "-")


@dataclass(frozen=True)
class Finding:
    flag: str  # the knob (internal name) or the input it is about; decides the checklist item
    severity: str  # ERROR or WARNING
    message: str  # what is wrong, naming the value; "{flag}" is replaced by the flag's spelling
    fix: str = ""  # what to do about it

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def text(self, spell: Callable[[str], str] = underscore_flag) -> str:
        msg = self.message.replace("{flag}", spell(self.flag))
        return f"{msg}: {self.fix}" if self.fix else msg

    def __str__(self) -> str:
        return self.text()


def error(flag: str, message: str, fix: str = "") -> Finding:
    return Finding(flag, ERROR, message, fix)


def warning(flag: str, message: str, fix: str = "") -> Finding:
    return Finding(flag, WARNING, message, fix)


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.is_error]


def warnings(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if not f.is_error]


class ConfigError(ValueError):
    """Bad flags, config values or inputs. Holds the error findings; str() is one line each."""

    def __init__(
        self, findings: Iterable[Finding] | str, spell: Callable[[str], str] = underscore_flag
    ):
        if isinstance(findings, str):
            findings = [error("", findings)]
        self.findings = list(findings)
        super().__init__("\n".join(f.text(spell) for f in self.findings))


def raise_errors(
    findings: Iterable[Finding],
    spell: Callable[[str], str] = underscore_flag,
    exc: type = ConfigError,
) -> list[Finding]:
    """Raise `exc` with every error among `findings`; return the warnings."""
    findings = list(findings)
    bad = errors(findings)
    if bad:
        if exc is ConfigError or issubclass(exc, ConfigError):
            raise exc(bad, spell)
        raise exc("\n".join(f.text(spell) for f in bad))
    return warnings(findings)


def at_least(flag: str, value, low, what: str = "") -> list[Finding]:
    """[] when value >= low, else one error (a common rule, written once)."""
    if value is None or value >= low:
        return []
    return [error(flag, f"{{flag}} {value} must be at least {low}{what}")]
