"""The browser product: streaming chat with stop / continue / regenerate-and-keep / edit / undo, thumbs with a
reason, an arena that compares two released versions on the current conversation, conversation history with
rename and delete, the model card, consent and privacy, themes and keyboard shortcuts.

    layout.py         where everything sits and which handler each control calls (``build_ui``)
    chat.py           the chat tab's handlers (``ChatHandlers``)
    conversations.py  the sidebar's handlers, the storage and privacy text (``ConversationHandlers``)
    arena.py          the Compare tab (``ArenaHandlers``)
    render.py         Markdown -> allowlisted HTML; version footer and notices; thumbs state
    model_card.py     the model card from ``lineage.json`` / ``meta.json`` beside the served weights
    state.py          the conversation of record kept per tab
    context.py        what every handler needs (service, user, sampling, open streams)

The page's CSS and JS live in ``app/static/`` and go to ``gr.mount_gradio_app`` as ``CSS`` and ``JS``.
"""

from __future__ import annotations

from pathlib import Path

from app.ui.layout import build_ui
from app.ui.render import pygments_css

STATIC = Path(__file__).resolve().parents[1] / "static"
CSS = (STATIC / "ui.css").read_text() + "\n" + pygments_css()
JS = (STATIC / "ui.js").read_text()

__all__ = ["CSS", "JS", "build_ui"]
