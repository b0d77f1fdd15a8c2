"""The pre-training corpus: plain text, deduplicated and filtered before a single token is trained on.

Documents are paragraphs (split on blank lines). Filters follow the usual web-text heuristics (Gopher/C4 style):
too few words, too little alphabetic text, link farms and boilerplate are dropped; exact duplicates (after
normalising case and whitespace) and near duplicates (MinHash over word 5-grams, Jaccard >= 0.8) keep their
first occurrence. The report says how many documents each rule removed; it is logged to the MLflow run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

MIN_WORDS = 8
MIN_ALPHA_SHARE = 0.7
MAX_URLS = 1
BOILERPLATE = ("all rights reserved", "terms of use", "privacy policy", "cookie settings", "subscribe to our")
URL_RE = re.compile(r"https?://\S+")


@dataclass
class CorpusReport:
    documents_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    documents_out: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def quality_problem(text: str) -> str | None:
    words = text.split()
    if len(words) < MIN_WORDS:
        return "too_short"
    if len(URL_RE.findall(text)) > MAX_URLS:
        return "links"
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if letters / max(len(text), 1) < MIN_ALPHA_SHARE:
        return "not_prose"
    low = text.lower()
    if sum(b in low for b in BOILERPLATE) >= 2:
        return "boilerplate"
    return None


def clean_corpus(text: str, near_threshold: float = 0.8) -> tuple[list[str], CorpusReport]:
    from datasketch import MinHash, MinHashLSH

    docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    report = CorpusReport(documents_in=len(docs))
    seen: set[str] = set()
    lsh = MinHashLSH(threshold=near_threshold, num_perm=64)
    out: list[str] = []
    for i, doc in enumerate(docs):
        problem = quality_problem(doc)
        if problem:
            report.drop(problem)
            continue
        norm = " ".join(doc.lower().split())
        key = hashlib.sha256(norm.encode()).hexdigest()
        if key in seen:
            report.drop("exact_duplicate")
            continue
        seen.add(key)
        words = norm.split()
        mh = MinHash(num_perm=64)
        for j in range(max(len(words) - 4, 1)):
            mh.update(" ".join(words[j : j + 5]).encode())
        if lsh.query(mh):
            report.drop("near_duplicate")
            continue
        lsh.insert(str(i), mh)
        out.append(doc)
    report.documents_out = len(out)
    return out, report


def load_corpus(path: str | Path, repo_root: Path | None = None) -> tuple[list[str], CorpusReport]:
    p = Path(path)
    if not p.is_absolute() and not p.exists() and repo_root is not None:
        p = repo_root / p
    if not p.exists():
        raise FileNotFoundError(f"corpus {path} does not exist: set data.corpus to a plain-text file")
    return clean_corpus(p.read_text(encoding="utf-8", errors="replace"))
