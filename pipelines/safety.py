"""Which answers are flagged as harmful, so that curation never uses them as positive examples.

PLACEHOLDER: ``classify`` is a keyword/regex classifier over a few explicit categories. It is deliberately
small and readable, and it over-flags rather than under-flags; replace it with a real safety classifier
(e.g. a Llama-Guard-style model) behind the same ``classify(text) -> SafetyVerdict`` function when one is
available. A flagged answer may still be a *negative* example (KTO label False, DPO ``rejected``).

Users' own reports count too: a thumbs-down whose reason mentions harm (``reason_flags_harm``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# category -> pattern over lower-cased text. Instructions for serious harm, not mere mentions of topics.
CATEGORIES: dict[str, re.Pattern[str]] = {
    "weapons": re.compile(
        r"\b(how to|steps to|instructions for|recipe for)\b.{0,40}\b(make|build|assemble)\b.{0,40}"
        r"\b(bomb|explosive|pipe bomb|nerve agent|bioweapon|chemical weapon|ghost gun)\b"
    ),
    "self_harm": re.compile(
        r"\b(you should|just|go ahead and)\s+(kill yourself|end your life|hurt yourself)\b"
        r"|\bbest way to (kill|harm) (yourself|myself)\b"
    ),
    "violence": re.compile(r"\b(kill|murder|poison|stab)\s+(him|her|them|your (boss|wife|husband|neighbou?r))\b"),
    "hate": re.compile(r"\b(subhuman|should be exterminated|deserve to die)\b"),
    "malware": re.compile(r"\b(ransomware|keylogger|credential stealer)\b.{0,40}\b(code|script|payload)\b"),
    "sexual_minors": re.compile(r"\b(sexual|explicit)\b.{0,30}\b(minor|child|underage)\b"),
}

_HARM_REASON = re.compile(
    r"\b(harm|harmful|unsafe|dangerous|toxic|offensive|hateful|abusive|violent|illegal|self[- ]harm)\b"
)


@dataclass(frozen=True)
class SafetyVerdict:
    harmful: bool
    categories: tuple[str, ...] = ()


def classify(text: str) -> SafetyVerdict:
    """Placeholder safety classifier: regex categories over the answer text."""
    low = text.lower()
    hits = tuple(name for name, pat in CATEGORIES.items() if pat.search(low))
    return SafetyVerdict(bool(hits), hits)


def reason_flags_harm(reason: str | None) -> bool:
    """A user's thumbs-down reason that reports the answer as harmful or unsafe."""
    return bool(reason) and bool(_HARM_REASON.search(reason.lower()))
