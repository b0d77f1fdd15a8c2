"""What a simulation measured: per version, per user and per answer, the thumbs AND the hidden truth.

Thumbs alone let the loop call "short" quality (issue 17). So every answer a simulated user receives is also
checked against its prompt (``PromptItem.judge``) and valued with that user's hidden utility (``Taste.value``):
``checked`` answers, how many were ``correct``, and the ``utility_sum``. Per version this says how much a
release gained in correctness and how much in form: ``form_cost`` is the mean utility lost to form complaints
(0 to 0.9), so ``mean_utility == 2 * accuracy - 1 - form_cost``. Per user it shows whose taste a change served.
``records`` keeps every judged answer for paired analyses (not in ``as_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@dataclass
class VersionStats:
    answers: int = 0
    thumbs: int = 0
    up: int = 0
    side_by_side: int = 0
    wins: int = 0
    ties: int = 0
    errors: int = 0
    checked: int = 0  # answers whose correctness was checked (every answer received)
    correct: int = 0
    utility_sum: float = 0.0  # hidden utility, summed over the checked answers

    def accuracy(self) -> float | None:
        return self.correct / self.checked if self.checked else None

    def mean_utility(self) -> float | None:
        return self.utility_sum / self.checked if self.checked else None

    def form_cost(self) -> float | None:
        """Mean utility lost to form (the rest of the mean utility is correctness: +1 right, -1 wrong)."""
        acc, mu = self.accuracy(), self.mean_utility()
        return None if acc is None or mu is None else 2 * acc - 1 - mu

    def as_dict(self) -> dict:
        return asdict(self) | {
            "utility_sum": round(self.utility_sum, 4),
            "accuracy": _r(self.accuracy()),
            "mean_utility": _r(self.mean_utility()),
            "form_cost": _r(self.form_cost()),
        }


@dataclass
class UserStats(VersionStats):
    """One person's hidden taste and what they got (same counters as a version)."""

    taste: str = ""
    miss_rate: float = 0.0


@dataclass(frozen=True)
class AnswerRecord:
    """One answer, judged: who asked what, which version answered, was it right, and its hidden utility."""

    user: str
    prompt_id: str
    kind: str
    version: str
    correct: bool
    utility: float
    liked: bool | None = None  # None: not rated with thumbs (e.g. only compared)


_COUNTS = ("users", "turns", "thumbs", "comparisons", "regenerations", "consent_withdrawn", "deletions")
_COUNTS += ("errors", "busy_retries", "checked", "correct")


@dataclass
class SimStats:
    users: int = 0
    turns: int = 0
    thumbs: int = 0
    comparisons: int = 0
    regenerations: int = 0
    consent_withdrawn: int = 0
    deletions: int = 0
    errors: int = 0
    busy_retries: int = 0
    checked: int = 0
    correct: int = 0
    utility_sum: float = 0.0
    seconds: float = 0.0
    tastes: dict[str, int] = field(default_factory=dict)
    per_version: dict[str, VersionStats] = field(default_factory=dict)
    per_user: dict[str, UserStats] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)  # what the first few failures said
    records: list[AnswerRecord] = field(default_factory=list)  # every judged answer (not in ``as_dict``)

    def note_error(self, what: str) -> None:
        if len(self.error_samples) < 5:
            self.error_samples.append(what)

    def version(self, name: str) -> VersionStats:
        return self.per_version.setdefault(name, VersionStats())

    def record(self, r: AnswerRecord) -> None:
        """Count one judged answer for its version, its user and the total."""
        self.records.append(r)
        self.checked += 1
        self.correct += r.correct
        self.utility_sum += r.utility
        for vs in (self.version(r.version), self.per_user.get(r.user)):
            if vs is not None:
                vs.checked += 1
                vs.correct += r.correct
                vs.utility_sum += r.utility

    def merge(self, other: SimStats) -> None:
        for k in _COUNTS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.utility_sum += other.utility_sum
        self.error_samples = (self.error_samples + other.error_samples)[:5]
        self.records += other.records
        self.per_user.update(other.per_user)
        for k, v in other.tastes.items():
            self.tastes[k] = self.tastes.get(k, 0) + v
        for name, vs in other.per_version.items():
            mine = self.version(name)
            for k, v in asdict(vs).items():
                setattr(mine, k, getattr(mine, k) + v)

    def totals(self) -> VersionStats:
        """Every version together: ``accuracy()``, ``mean_utility()``, ``form_cost()`` of the whole run."""
        hidden = {"checked": self.checked, "correct": self.correct, "utility_sum": self.utility_sum}
        return VersionStats(answers=self.turns, thumbs=self.thumbs, **hidden)

    def accuracy(self) -> float | None:
        return self.totals().accuracy()

    def mean_utility(self) -> float | None:
        return self.totals().mean_utility()

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("records", "per_version", "per_user")}
        hidden = self.totals().as_dict()
        d |= {k: hidden[k] for k in ("utility_sum", "accuracy", "mean_utility", "form_cost")}
        d["per_version"] = {k: v.as_dict() for k, v in sorted(self.per_version.items())}
        d["per_user"] = {k: v.as_dict() for k, v in sorted(self.per_user.items())}
        return d
