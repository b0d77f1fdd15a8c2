"""Exact and near-duplicate removal: normalised-text hashes, then MinHash LSH (``datasketch``).

Rows are visited in the caller's (deterministic) order and the first of a group is kept, so the same input
always keeps the same rows. A near-duplicate is a row whose word-shingle set has estimated Jaccard similarity
>= the threshold with an already kept row; LSH only proposes candidates, the MinHash estimate decides.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from datasketch import MinHash, MinHashLSH

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class DedupeResult:
    keep: list[bool]
    exact: int
    near: int


def shingles(text: str, n: int) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode()] if words else [b""]
    return list(dict.fromkeys(" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)))


def dedupe(
    texts: Sequence[str],
    threshold: float = 0.85,
    num_perm: int = 64,
    shingle_words: int = 3,
    sketch_cache: dict[str, MinHash] | None = None,
) -> DedupeResult:
    """``sketch_cache`` (text -> MinHash) lets several tables that share texts (SFT and liked KTO rows) hash each
    text once; pass the same dict for the same num_perm and shingle size only."""
    keep = [False] * len(texts)
    exact = near = 0
    seen: set[bytes] = set()
    survivors: list[int] = []
    for i, t in enumerate(texts):
        h = hashlib.blake2b(normalize(t).encode(), digest_size=16).digest()
        if h in seen:
            exact += 1
            continue
        seen.add(h)
        survivors.append(i)
    if threshold >= 1.0 or len(survivors) < 2:
        for i in survivors:
            keep[i] = True
        return DedupeResult(keep, exact, 0)

    # LSH only proposes candidates: band it for a lower similarity and weigh misses heavily, since a banding tuned
    # exactly at the threshold misses about half of the pairs just above it; the MinHash estimate then decides.
    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.15), num_perm=num_perm, weights=(0.3, 0.7))
    # crc32: a deterministic C hash, ~5x cheaper than datasketch's default sha1 per shingle.
    # bulk() shares one permutation set across sketches; creating it per MinHash dominates the cost otherwise.
    cache = sketch_cache if sketch_cache is not None else {}
    missing = list(dict.fromkeys(texts[i] for i in survivors if texts[i] not in cache))
    made = MinHash.bulk((shingles(t, shingle_words) for t in missing), num_perm=num_perm, seed=1, hashfunc=zlib.crc32)
    cache.update(zip(missing, made, strict=True))
    sketches = [cache[texts[i]] for i in survivors]
    kept: dict[str, MinHash] = {}
    for i, m in zip(survivors, sketches, strict=True):
        dup = False
        for key in lsh.query(m):
            if kept[key].jaccard(m) >= threshold:
                dup = True
                break
        if dup:
            near += 1
            continue
        key = str(i)
        lsh.insert(key, m, check_duplication=False)
        kept[key] = m
        keep[i] = True
    return DedupeResult(keep, exact, near)
