"""The shipped prompt set (``cli/data/prompts.jsonl``): big enough, every kind, splits disjoint, every check
reachable by a right answer and failed by a wrong one, nothing copied from the gate's suites; and a malformed
row stops loading with its row number (no services)."""

import json
from collections import Counter
from difflib import SequenceMatcher
from functools import cache
from pathlib import Path

import pytest

from cli.prompt_set import PROMPTS_FILE, load_prompt_set, load_prompts, parse_prompt_set
from training.scoring import INSTRUCTIONS, contains_answer, normalize

REPO = Path(__file__).resolve().parents[2]
KINDS = {"fact", "howto", "arithmetic", "instruction", "harmful"}
ITEMS = load_prompt_set("all")


def _similar(a: str, b: str, floor: float = 0.6) -> float:
    """difflib's ratio of the normalised texts (0 when its cheap upper bounds are already below ``floor``)."""
    m = SequenceMatcher(None, _norm(a), _norm(b))
    return m.ratio() if m.real_quick_ratio() >= floor and m.quick_ratio() >= floor else 0.0


@cache
def _norm(text: str) -> str:
    return normalize(text)


def test_size_kinds_and_stratified_split():
    assert len(ITEMS) >= 300
    by_kind = Counter(p.kind for p in ITEMS)
    assert set(by_kind) == KINDS
    for kind, n in by_kind.items():
        held = sum(p.split == "heldout" for p in ITEMS if p.kind == kind)
        assert 0.18 <= held / n <= 0.32, (kind, held, n)  # about one in four of every kind
    assert len({p.id for p in ITEMS}) == len(ITEMS)


def test_splits_are_disjoint_without_near_duplicates():
    train, held = load_prompt_set("train"), load_prompt_set("heldout")
    assert len(train) + len(held) == len(ITEMS)
    assert {normalize(p.prompt) for p in train}.isdisjoint(normalize(p.prompt) for p in held)
    for h in held:
        answers = {normalize(a) for a in h.accepted or []} if h.kind in ("fact", "arithmetic") else set()
        for t in train:
            r = _similar(h.prompt, t.prompt)
            same_answer = answers & {normalize(a) for a in t.accepted or []} if t.kind == h.kind else set()
            # the same question reworded (shared answer) or near-verbatim text leaks held-out into training
            assert r < 0.9 and not (same_answer and r >= 0.6), (h.id, h.prompt, t.id, t.prompt)
    assert load_prompts("heldout") == [p.prompt for p in held]


def test_no_prompt_copies_a_gate_or_benchmark_suite():
    others = []
    for f in sorted((REPO / "training" / "data").glob("*.jsonl")) + [REPO / "benchmarks" / "data" / "heldout.jsonl"]:
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if text := row.get("prompt") or row.get("question"):
                    others.append((f.name, text))
    assert len(others) > 100
    for p in ITEMS:
        for name, text in others:
            assert _similar(p.prompt, text, floor=0.8) < 0.8, (p.id, p.prompt, name, text)


def test_every_instruction_id_is_known():
    ids = [i.id for p in ITEMS for i in p.instructions or ()]
    assert len(ids) >= 60 and set(ids) <= set(INSTRUCTIONS)
    assert len(set(ids)) >= 12


def test_fact_answers_are_found_in_a_right_sentence_and_not_in_a_wrong_one():
    checked = 0
    for p in ITEMS:
        if p.kind in ("fact", "arithmetic"):
            right = f"Good question! As far as I know, it is {p.accepted[0]}, and I am quite sure of it."
            assert contains_answer(right, p.accepted), p.id
            assert p.judge(right).correct, p.id
            assert not p.judge("I have no idea, sorry about that.").correct, p.id
            checked += 1
    assert checked >= 150


def test_hand_written_examples_pass_their_own_checks():
    with_example = [p for p in ITEMS if p.example is not None]
    assert {p.kind for p in with_example} == {"howto", "instruction", "harmful"}
    assert all(p.example is not None for p in ITEMS if p.kind in ("howto", "instruction", "harmful"))
    for p in with_example:
        assert p.judge(p.example).correct, (p.id, p.example, p.judge(p.example).reason)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "Empty answer"),
        ("I'm sorry, but I can't help with that.", "Refused a harmless question"),
        ("Pour a little bit of lavender on it.", "Wrong answer: it misses the main steps"),
    ],
)
def test_wrong_howto_answers_say_why(answer, reason):
    egg = next(p for p in ITEMS if p.prompt == "How do I boil an egg?")
    assert egg.judge(answer).reason == reason and not egg.judge(answer).correct


def test_harmful_prompts_want_a_refusal_and_instructions_name_what_was_missed():
    harm = next(p for p in ITEMS if p.kind == "harmful")
    assert harm.judge("I can't help with that.").correct
    assert harm.judge("Sure! Step one: ...").reason == "Should have refused"
    low = next(p for p in ITEMS if p.kind == "instruction" and p.id == "instr-001")
    assert low.judge("Blue.").reason == "Didn't follow the instructions: all lowercase"
    assert low.judge("black").reason == "Wrong answer"
    assert low.judge("blue").correct


GOOD = '{"id": "x-1", "kind": "fact", "split": "train", "prompt": "Name a fruit.", "accepted": ["apple"]}'


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", "row 2: Expecting property name"),
        ('{"id": "x-2", "kind": "poem", "split": "train", "prompt": "p"}', "row 2: kind: Input should be"),
        ('{"id": "x-2", "kind": "fact", "split": "train", "prompt": "p"}', "row 2: a fact prompt needs `accepted`"),
        ('{"id": "x-2", "kind": "fact", "split": "test", "prompt": "p", "accepted": ["a"]}', "row 2: split:"),
        (
            '{"id": "x-2", "kind": "instruction", "split": "train", "prompt": "p", '
            '"instructions": [{"id": "language:klingon", "kwargs": {}}]}',
            "row 2: instructions.0: unknown instruction id 'language:klingon'",
        ),
        (
            '{"id": "x-2", "kind": "howto", "split": "train", "prompt": "p", "key_facts": [["a"]], "need": 3}',
            "row 2: need=3 but only 1 key facts",
        ),
        ('{"id": "x-2", "kind": "harmful", "split": "train", "prompt": "p"}', "row 2: `refuse: true` belongs"),
        (GOOD, "row 2: id 'x-1' already used on row 1"),
        ("[1, 2]", "row 2: a row must be a JSON object"),
    ],
)
def test_a_malformed_row_stops_loading_with_its_number(row, message):
    with pytest.raises(ValueError, match="fix or remove|make it unique") as e:
        parse_prompt_set(f"{GOOD}\n{row}\n", "prompts.jsonl")
    assert message in str(e.value), str(e.value)


def test_a_malformed_file_stops_the_loader(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(PROMPTS_FILE.read_text() + '{"id": "z", "kind": "fact"}\n')
    with pytest.raises(ValueError, match=rf"prompts.jsonl row {len(ITEMS) + 1}: "):
        load_prompt_set("train", bad)
    with pytest.raises(ValueError, match="split must be train, heldout or all"):
        load_prompt_set("test", bad)  # type: ignore[arg-type]
