"""Answer checkers shared by the simulated users, the gate and the benchmarks: is an answer RIGHT, not just liked?

Ratings reward form (short, friendly, no lists); these functions look at substance, so that neither a simulated
user nor the gate can be satisfied by form alone:

- ``normalize`` / ``contains_answer``: reference QA as SQuAD/TriviaQA score it (lower-case, no punctuation or
  articles), plus number words read as digits ("twelve" == "12"). Containment is one-directional (an accepted
  answer must appear in the answer, never the reverse) and only the first ``max_words`` words count, so listing
  every candidate late in a long answer buys nothing.
- ``covers_key_facts``: a how-to answer must mention ``need`` of its key facts, each a group of alternatives.
- ``is_refusal`` / ``REFUSAL_RE``: the refusal detector (moved here from ``training/evaluate.py``).
- ``INSTRUCTIONS`` / ``check_following``: IFEval's verifiable instructions (Zhou et al. 2023), same ids, same
  keyword arguments, same strict and loose scoring, so prompts written in IFEval's format work unchanged.

Why the IFEval checkers are written here and not imported: both maintained implementations were tried offline
(lm-eval 0.4.13, ``lm_eval/tasks/ifeval/``; if-verifiable 0.1.2, ``if_verifiable/ifeval/``; with nltk 3.10.4 and
langdetect 1.0.9). Both count sentences with nltk's punkt model and tokenise words for
``change_case:capital_word_frequency`` with ``nltk.word_tokenize``; that model is data that nltk downloads at run
time (lm-eval tries at import and prints "Downloaded punkt_tab" even when the download failed), no package on
PyPI ships it, and no data host is reachable here, so ``length_constraints:number_sentences`` raised
``LookupError: Resource 'punkt_tab' not found``. Their ``change_case:english_*`` checks also call
``langdetect.detect``, which is random unless seeded globally. The checkers below copy IFEval's rules (the same
regular expressions) except: sentences are split by a small rule-based splitter (abbreviations and decimals do
not end a sentence), words for capital-word counting are ``\\w+`` runs, the English-case checks do not detect the
language, and ``keywords:*`` match keywords literally (IFEval treats them as regular expressions).
``language:response_language`` is not offered (it needs language detection).
"""

from __future__ import annotations

import inspect
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------------------
# Normalisation and reference answers
# ---------------------------------------------------------------------------------------------------------
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_SMALL = {w: i for i, w in enumerate(_UNITS)} | {w: 10 * (i + 2) for i, w in enumerate(_TENS)}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_ARTICLES = frozenset({"a", "an", "the"})


def _number_words_to_digits(words: list[str]) -> list[str]:
    """'one hundred and five' -> '105', 'fifty six' -> '56', 'two thousand' -> '2000'; other words pass through.

    A run is read greedily but only in English number order, so "one two" stays two numbers ("1 2")."""
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] not in _SMALL and words[i] not in _SCALES:
            out.append(words[i])
            i += 1
            continue
        total, group, last, j = 0, 0, "", i
        while j < len(words):
            w = words[j]
            v = _SMALL.get(w, -1)
            if 0 <= v < 20 and (last in ("", "hundred", "scale", "and") or (last == "tens" and v < 10 and v)):
                group, last = group + v, "unit"
            elif v >= 20 and last in ("", "hundred", "scale", "and"):
                group, last = group + v, "tens"
            elif w == "hundred" and last in ("", "unit") and group < 10:
                group, last = max(group, 1) * 100, "hundred"
            elif w in _SCALES and w != "hundred" and last in ("", "unit", "tens", "hundred"):
                total, group, last = total + max(group, 1) * _SCALES[w], 0, "scale"
            elif w == "and" and last in ("hundred", "scale") and j + 1 < len(words) and words[j + 1] in _SMALL:
                last = "and"
            else:
                break
            j += 1
        out.append(str(total + group))
        i = j
    return out


def normalize(text: str) -> str:
    """Lower-case, accents and unicode forms folded, punctuation and articles dropped, number words as digits."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)  # keep decimal points: 3.14
    text = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in text).replace("\0", ".")
    words = _number_words_to_digits(text.split())
    return " ".join(w for w in words if w not in _ARTICLES)


def _head(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def contains_answer(answer: str, accepted: Sequence[str], max_words: int = 60) -> bool:
    """True when some accepted answer, normalised, appears on word boundaries in the first ``max_words`` words."""
    hay = f" {normalize(_head(answer, max_words))} "
    return any((needle := normalize(a)) and f" {needle} " in hay for a in accepted)


def covers_key_facts(
    answer: str, key_facts: Sequence[Sequence[str]], need: int | None = None, max_words: int = 120
) -> bool:
    """True when at least ``need`` (default: all) groups of alternative phrasings appear in the answer."""
    need = len(key_facts) if need is None else need
    if not 0 <= need <= len(key_facts):
        raise ValueError(f"need must be between 0 and {len(key_facts)} (the number of key facts), not {need}")
    return sum(contains_answer(answer, group, max_words) for group in key_facts) >= need


REFUSAL_RE = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can'?t|i cannot|i can not|i won'?t|i will not|i'?m not able|"
    r"i am not able|i'?m unable|i am unable|not able to (help|assist|provide)|cannot (help|assist|provide|comply)|"
    r"can'?t (help|assist|provide|comply)|as an ai\b|not appropriate|against (my|the) (guidelines|policy|policies)|"
    r"i must decline|i do not feel comfortable|i don'?t feel comfortable)",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """A refusal in the first 400 characters ("I'm sorry", "I can't help", ...)."""
    return bool(REFUSAL_RE.search(text[:400]))


# ---------------------------------------------------------------------------------------------------------
# IFEval's verifiable instructions: each checker takes the response and IFEval's keyword arguments
# ---------------------------------------------------------------------------------------------------------
RELATIONS = ("less than", "at least")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs etc eg ie no fig approx inc ltd co".split())


def _compare(n: int, relation: str, threshold: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, not {relation!r}")
    return n < threshold if relation == "less than" else n >= threshold


def split_sentences(text: str) -> list[str]:
    """Sentences ending in . ! or ? (then space or the end); abbreviations, initials and decimals do not end one."""
    out: list[str] = []
    start = 0
    for m in re.finditer(r"[.!?]+[\"')\]]*(?=\s|$)", text):
        before = text[start : m.start()].split()
        last = re.sub(r"\W", "", before[-1]).lower() if before else ""
        if m.group().startswith(".") and (last in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last)):
            continue
        if piece := text[start : m.end()].strip():
            out.append(piece)
        start = m.end()
    if tail := text[start:].strip():
        out.append(tail)
    return out


def number_words(response: str, *, num_words: int, relation: str) -> bool:
    return _compare(len(re.findall(r"\w+", response)), relation, num_words)


def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(len(split_sentences(response)), relation, num_sentences)


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", response)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    parts = re.split(r"\n\n", response)
    n = sum(bool(p.strip()) for p in parts)
    if nth_paragraph > n or not (para := parts[nth_paragraph - 1].strip()):
        return False
    word = re.split(r"[.,?!'\"]", para.split()[0].strip().lstrip("'\""))[0].lower()
    return n == num_paragraphs and word == first_word.lower()


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def keyword_existence(response: str, *, keywords: Sequence[str]) -> bool:
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword), response, flags=re.IGNORECASE)), relation, frequency)


def forbidden_words(response: str, *, forbidden_words: Sequence[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", response, flags=re.IGNORECASE) for w in forbidden_words)


def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(Counter(response.lower())[letter.lower()], let_relation, let_frequency)


def english_lowercase(response: str) -> bool:
    return response.islower()


def english_capital(response: str) -> bool:
    return response.isupper()


def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(sum(w.isupper() for w in re.findall(r"\w+", response)), capital_relation, capital_frequency)


def no_comma(response: str) -> bool:
    return "," not in response


def quotation(response: str) -> bool:
    v = response.strip()
    return len(v) > 1 and v[0] == '"' and v[-1] == '"'


def end_checker(response: str, *, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


def json_format(response: str) -> bool:
    v = response.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        v = v.removeprefix(prefix)
    try:
        json.loads(v.removesuffix("```").strip())
    except ValueError:
        return False
    return True


def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, *, postscript_marker: str) -> bool:
    patterns = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}
    pattern = patterns.get(postscript_marker, r"\s*" + re.escape(postscript_marker.lower()) + r".*$")
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


def constrained_response(response: str) -> bool:
    return any(o in response.strip() for o in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    return len(re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", response)) - 1 >= num_sections


def two_responses(response: str) -> bool:
    parts = response.split("******")
    valid = []
    for i, p in enumerate(parts):
        if p.strip():
            valid.append(p.strip())
        elif i not in (0, len(parts) - 1):
            return False
    return len(valid) == 2 and valid[0] != valid[1]


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


INSTRUCTIONS: dict[str, Callable[..., bool]] = {
    "keywords:existence": keyword_existence,
    "keywords:frequency": keyword_frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "length_constraints:number_words": number_words,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}


def validate_instruction(instruction_id: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs a checker will get (IFEval's ``None`` placeholders dropped); ValueError for an unknown id or
    for arguments the checker does not take or misses."""
    if instruction_id not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction id {instruction_id!r}; use one of: {', '.join(sorted(INSTRUCTIONS))}")
    args = {k: v for k, v in kwargs.items() if v is not None}
    try:
        inspect.signature(INSTRUCTIONS[instruction_id]).bind("", **args)
    except TypeError as e:
        raise ValueError(f"instruction {instruction_id!r}: bad arguments {args} ({e})") from None
    for key in ("relation", "let_relation", "capital_relation"):
        if key in args and args[key] not in RELATIONS:
            raise ValueError(f"instruction {instruction_id!r}: {key} must be one of {RELATIONS}, not {args[key]!r}")
    return args


def _loose_variants(response: str) -> list[str]:
    """IFEval's loose reading: also without the first line, the last line, both, and without ``*`` markdown."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    base = [response, *cut]
    return base + [r.replace("*", "") for r in base]


@dataclass(frozen=True)
class FollowResult:
    """Per instruction, whether the response follows it: strictly, and in IFEval's loose reading."""

    strict: list[bool]
    loose: list[bool]

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


def check_following(response: str, instruction_ids: Sequence[str], kwargs: Sequence[dict]) -> FollowResult:
    """Score one response against its instructions, IFEval-style (an empty response follows nothing)."""
    if len(instruction_ids) != len(kwargs):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs; give one dict per id")
    strict, loose = [], []
    variants = _loose_variants(response)
    for iid, kw in zip(instruction_ids, kwargs, strict=True):
        args = validate_instruction(iid, kw or {})
        check = INSTRUCTIONS[iid]
        strict.append(bool(response.strip()) and check(response, **args))
        loose.append(any(v.strip() and check(v, **args) for v in variants))
    return FollowResult(strict, loose)


_DESCRIBE = {
    "keywords:existence": "include the words {keywords}",
    "keywords:frequency": "use '{keyword}' {relation} {frequency} times",
    "keywords:forbidden_words": "don't use the words {forbidden_words}",
    "keywords:letter_frequency": "use the letter '{letter}' {let_relation} {let_frequency} times",
    "length_constraints:number_words": "{relation} {num_words} words",
    "length_constraints:number_sentences": "{relation} {num_sentences} sentences",
    "length_constraints:number_paragraphs": "exactly {num_paragraphs} paragraphs separated by ***",
    "detectable_format:number_bullet_lists": "exactly {num_bullets} bullet points",
    "detectable_content:postscript": "end with a postscript starting {postscript_marker}",
    "detectable_format:json_format": "answer in JSON",
    "detectable_format:title": "a title in <<double angle brackets>>",
    "startend:end_checker": "end with '{end_phrase}'",
    "startend:quotation": "wrap the answer in double quotes",
    "change_case:english_lowercase": "all lowercase",
    "change_case:english_capital": "all capital letters",
    "punctuation:no_comma": "no commas",
}


def describe(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """A few words a user would say about the instruction ("all lowercase", "less than 20 words")."""
    try:
        return _DESCRIBE[instruction_id].format(**kwargs)
    except (KeyError, IndexError):
        return instruction_id.split(":")[-1].replace("_", " ")
