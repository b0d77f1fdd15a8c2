"""``training.scoring``: the answer checkers, on hand-written answers (no services).

Each IFEval checker is shown once following and once not; containment is one-directional, reads number words,
and stops at the length cap; the loose reading forgives a first/last line and ``*`` markdown, as IFEval's does.
"""

import pytest

from training.scoring import (
    INSTRUCTIONS,
    check_following,
    contains_answer,
    covers_key_facts,
    is_refusal,
    normalize,
    split_sentences,
    validate_instruction,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is Twelve.", "answer is 12"),
        ("Fifty-six!", "56"),
        ("one hundred and five", "105"),
        ("two thousand and twenty-four", "2024"),
        ("one two three", "1 2 3"),
        ("It costs 1,000 dollars, about 3.14 each.", "it costs 1000 dollars about 3.14 each"),
        ("Café in São Paulo", "cafe in sao paulo"),
        ("An apple, a pear and the plum", "apple pear and plum"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_number_words_and_digits_match_both_ways():
    assert contains_answer("There are twelve months in a year.", ["12"])
    assert contains_answer("7 x 8 = 56", ["fifty-six"])
    assert contains_answer("It is fifty six.", ["56"])
    assert not contains_answer("There are 120 of them.", ["12"])  # word boundaries, not substrings


def test_containment_is_one_directional():
    assert contains_answer("The capital of France is Paris.", ["Paris"])
    assert not contains_answer("Paris", ["Paris, France"])  # the answer inside the accepted one does not count
    assert not contains_answer("It is Parisian food.", ["Paris"])
    assert not contains_answer("", ["Paris"])
    assert not contains_answer("anything at all", [""])  # an empty accepted answer never matches


def test_length_cap_ignores_late_candidates():
    hedge = "I am not sure. " + "It could be many cities, for example. " * 10 + "Maybe Canberra."
    assert len(hedge.split()) > 60
    assert not contains_answer(hedge, ["Canberra"])
    assert contains_answer(hedge, ["Canberra"], max_words=200)
    assert contains_answer("Canberra. " + hedge, ["Canberra"])


def test_key_facts():
    facts = [["water"], ["boil", "boiling"], ["minutes", "minute"]]
    good = "Put the egg in boiling water for about eight minutes."
    assert covers_key_facts(good, facts)
    assert covers_key_facts("Use water and let it boil.", facts, need=2)
    assert not covers_key_facts("Use water and let it boil.", facts)
    assert not covers_key_facts("Pour a little bit of lavender on it.", facts, need=1)
    with pytest.raises(ValueError, match="need must be between 0 and 3"):
        covers_key_facts(good, facts, need=4)


def test_refusals():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot assist with this request.")
    assert not is_refusal("Paris is the capital of France.")


def test_sentences():
    assert split_sentences("Dr. Smith paid 3.50 dollars. He left! Did he?") == [
        "Dr. Smith paid 3.50 dollars.",
        "He left!",
        "Did he?",
    ]
    assert split_sentences("No end mark") == ["No end mark"]


# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
    ("keywords:existence", {"keywords": ["umbrella", "puddle"]}, "An umbrella over a puddle.", "Rain fell."),
    ("keywords:frequency", {"keyword": "key", "frequency": 2, "relation": "at least"}, "key, key", "one key"),
    ("keywords:forbidden_words", {"forbidden_words": ["tree"]}, "Green leaves and streets.", "A tall tree."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zoo zebra", "zoo"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Cats purr.", "a b c d e f"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two three", "one two"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "One. ", "One. Two."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "First only."),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "First part.\n\nThen, the second.",
        "First part.\n\nAfter that.",
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name] at [place]", "Dear [name]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. Bye."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes, it is."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and *b*", "*a* and b"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1 food Section 2 games",
        "Section 1 only",
    ),
    ("detectable_format:json_format", {}, '```json\n{"animal": "cat"}\n```', "animal: cat"),
    ("detectable_format:title", {}, "<<Rain>>\nDrops fall.", "Rain\nDrops fall."),
    ("combination:two_responses", {}, "Clover\n******\nBiscuit", "Clover\n******\nClover"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "What do cows drink?"}, "What do cows drink? Water.", "Water."),
    ("startend:end_checker", {"end_phrase": "Have a good day."}, "Hello. Have a good day.", "Have a good day. Bye."),
    ("startend:quotation", {}, '"Summer."', "Summer."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}, "VERY BIG", "Big"),
    ("change_case:english_capital", {}, "HELLO THERE", "Hello there"),
    ("change_case:english_lowercase", {}, "hello there", "Hello there"),
    ("punctuation:no_comma", {}, "No commas here.", "Yes, one comma."),
]


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_checker_passes_and_fails(iid, kwargs, good, bad):
    assert check_following(good, [iid], [kwargs]).strict == [True]
    assert check_following(bad, [iid], [kwargs]).strict == [False]


def test_every_checker_has_a_case():
    assert {c[0] for c in CASES} == set(INSTRUCTIONS)
    assert len(INSTRUCTIONS) >= 12


def test_loose_forgives_a_preamble_and_markdown():
    ids, kwargs = ["startend:end_checker", "change_case:english_lowercase"], [{"end_phrase": "bye"}, {}]
    r = check_following("Sure! Here it is:\nwe had fun, bye", ids, kwargs)
    assert r.strict == [True, False] and not r.prompt_strict
    assert r.loose == [True, True] and r.prompt_loose
    r = check_following("**HELLO**", ["startend:quotation"], [{}])
    assert not r.prompt_loose
    assert check_following('*"quoted"*', ["startend:quotation"], [{}]).loose == [True]
    assert check_following("", ["punctuation:no_comma"], [{}]).loose == [False]  # empty follows nothing


def test_ifeval_none_kwargs_are_dropped():
    assert check_following("a b", ["punctuation:no_comma"], [{"num_words": None}]).strict == [True]


def test_bad_instructions_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown instruction id 'language:klingon'"):
        check_following("x", ["language:klingon"], [{}])
    with pytest.raises(ValueError, match="bad arguments"):
        validate_instruction("length_constraints:number_words", {"num_words": 5})  # relation missing
    with pytest.raises(ValueError, match="relation must be one of"):
        validate_instruction("length_constraints:number_words", {"num_words": 5, "relation": "about"})
    with pytest.raises(ValueError, match="one dict per id"):
        check_following("x", ["punctuation:no_comma"], [])
