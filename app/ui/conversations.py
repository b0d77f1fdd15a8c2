"""The sidebar's handlers: page load, new chat, open / rename / delete a conversation, consent, delete all data.

Conversations are kept on the server (``app/sessions.py``, keyed by the signed cookie's user id), and the text
shown says so; the privacy panel (``PRIVACY``) says what is collected, what it is for, and how to take it back.
"""

from __future__ import annotations

import gradio as gr

from app.deletion import delete_user
from app.ui.chat import chatbot_update, idle_controls
from app.ui.context import UIContext
from app.ui.model_card import card_markdown, model_line, read_card
from app.ui.render import md_text, status_md
from app.ui.state import Chat, chat_of, new_chat
from app.validation import InputError, clean_text
from feedback.spool import SpoolFull

MAX_TITLE_CHARS = 80
STORAGE_TEXT = (
    "Your conversations are stored on this Flywheel server under a random id kept in a cookie of "
    "this browser, so they come back on your next visit here."
)
PRIVACY = """
**What is collected.** Each message you send and the answer to it, which model version answered and how fast,
your thumbs, reasons, votes and choices between answers, and this consent setting. They are tied to a random id
in a cookie of this browser: no name, no e-mail.

**Where it goes.** Your conversation history is kept on this server. Every answer and rating is also recorded as
an event (Apache Kafka, then a DuckDB warehouse) with your consent setting attached.

**What for.** Without consent, only to run the service and to count how each model version does. With consent,
also to train new versions of the model: curation keeps consented conversations, scrubs personal details (names,
e-mails, phone numbers ...) and turns liked answers and your comparisons into training data.

**How to take it back.** Untick the box: from the next curation on, none of your conversations, earlier ones
included, go into a training set. *Delete all my data* removes your history from this server and sends a deletion
request that removes your events from the warehouse and the dataset snapshots, and marks every model version
trained on them as tainted so it is not served again.
"""


def title_of(choices: list[tuple[str, str]], conversation_id: str | None) -> str:
    return next((t for t, c in choices if c == conversation_id), "")


class ConversationHandlers:
    def __init__(self, ctx: UIContext):
        self.ctx = ctx

    def on_load(self, request: gr.Request) -> tuple:
        """A fresh chat, this user's history and consent, the storage line and the model card."""
        uid = self.ctx.user_of(request)
        who = request.username if getattr(request, "username", None) else None
        storage = (f"Signed in as {md_text(who)}. " if who else "") + STORAGE_TEXT
        card = read_card(self.ctx.service.settings, self.ctx.service.version_for(uid))
        st = new_chat()
        return (
            st,
            chatbot_update(st),
            gr.update(choices=self.ctx.history(uid), value=None),
            self.ctx.sessions.consent(uid),
            storage,
            model_line(card),
            card_markdown(card),
        )

    def start_new(self, request: gr.Request) -> tuple:
        uid = self.ctx.user_of(request)
        st = new_chat()
        controls = idle_controls(st)
        return (
            st,
            chatbot_update(st),
            gr.update(choices=self.ctx.history(uid), value=None),
            "",
            gr.update(visible=False),
            controls["cont"],
            controls["keep"],
            gr.update(visible=False),
        )

    def open(self, conversation_id: str | None, request: gr.Request) -> tuple:
        uid = self.ctx.user_of(request)
        msgs = self.ctx.sessions.load_conversation(uid, conversation_id) if conversation_id else None
        if msgs is None:
            return gr.skip(), gr.skip(), status_md("That conversation is not available."), gr.skip(), gr.skip()
        st = chat_of(conversation_id, msgs)
        controls = idle_controls(st)
        return st, chatbot_update(st), "", controls["cont"], controls["keep"]

    # ---- rename / delete the open conversation ---------------------------------------------------
    def ask_rename(self, st: Chat, request: gr.Request) -> tuple:
        uid = self.ctx.user_of(request)
        title = self.ctx.sessions.conversation_title(uid, st["conversation_id"])
        if title is None:
            return gr.update(visible=False), gr.skip(), status_md("Send a message first: this chat is not saved yet.")
        return gr.update(visible=True), gr.update(value=title), ""

    def rename(self, title: str, st: Chat, request: gr.Request) -> tuple:
        uid = self.ctx.user_of(request)
        try:
            title = " ".join(clean_text(title, what="title", limit=MAX_TITLE_CHARS).split())
        except InputError as e:
            return gr.skip(), gr.skip(), status_md(e.message)
        if not self.ctx.sessions.rename_conversation(uid, st["conversation_id"], title):
            return gr.update(visible=False), gr.skip(), status_md("That conversation is not available.")
        return (
            gr.update(visible=False),
            gr.update(choices=self.ctx.history(uid), value=st["conversation_id"]),
            status_md("Renamed.", "ok"),
        )

    def ask_delete(self, st: Chat, request: gr.Request) -> tuple:
        uid = self.ctx.user_of(request)
        title = self.ctx.sessions.conversation_title(uid, st["conversation_id"])
        if title is None:
            return gr.update(visible=False), gr.skip(), status_md("This chat is not saved yet: nothing to delete.")
        return gr.update(visible=True), f"Delete “{md_text(title)}”? This cannot be undone.", ""

    def delete(self, st: Chat, request: gr.Request) -> tuple:
        """Delete the open conversation from the history and start a new chat."""
        uid = self.ctx.user_of(request)
        gone = self.ctx.sessions.delete_conversation(uid, st["conversation_id"])
        fresh = new_chat()
        said = status_md("Conversation deleted.", "ok") if gone else status_md("That conversation is not available.")
        return (
            gr.update(visible=False),
            fresh,
            chatbot_update(fresh),
            gr.update(choices=self.ctx.history(uid), value=None),
            said,
        )

    # ---- consent and deletion --------------------------------------------------------------------
    def set_consent(self, value: bool, request: gr.Request) -> str:
        uid = self.ctx.user_of(request)
        self.ctx.service.set_consent(uid, bool(value))
        return status_md(
            "Thank you: your conversations may be used to improve the model."
            if value
            else "Your conversations will not be used to improve the model, earlier ones included.",
            "ok",
        )

    def delete_all(self, request: gr.Request) -> tuple:
        """Everything this user left here: history, and a deletion request for every store downstream."""
        uid = self.ctx.user_of(request)
        try:
            delete_user(self.ctx.service, uid)
        except SpoolFull:
            return (
                gr.update(visible=False),
                gr.skip(),
                gr.skip(),
                gr.skip(),
                gr.skip(),
                status_md(
                    "The deletion request could not be recorded right now; nothing was changed. "
                    "Please try again in a minute."
                ),
            )
        fresh = new_chat()
        return (
            gr.update(visible=False),
            fresh,
            chatbot_update(fresh),
            gr.update(choices=[], value=None),
            False,
            status_md("All your data here is deleted, and the deletion request is on its way to every store.", "ok"),
        )
