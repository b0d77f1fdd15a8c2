"""Where everything sits and which handler each control calls. No logic here: handlers live in
``chat.py`` (the chat tab), ``conversations.py`` (the sidebar), ``arena.py`` (the Compare tab)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from app.service import ChatService
from app.ui.arena import ArenaHandlers, context_note, label, pane
from app.ui.chat import ChatHandlers
from app.ui.context import UIContext
from app.ui.conversations import PRIVACY, ConversationHandlers
from app.ui.state import new_chat

API_LINK = '<a id="api-link" href="/v1/docs" target="_blank" rel="noopener">Use via API ↗</a>'
SHORTCUTS = """
| keys | does |
|---|---|
| Enter / Shift+Enter | send / new line |
| Esc | stop the answer |
| Ctrl+Shift+O | new chat |
| Ctrl+Shift+C | copy the last answer |
| Ctrl+Shift+S | show or hide the sidebar |
| Shift+Esc or / | focus the message box |
| Ctrl+Shift+L | light or dark theme |
"""


GENERATING = dict(concurrency_limit=None, show_progress="hidden")  # streaming handlers: no queue limit, no spinner


def build_ui(service: ChatService, *, max_new_tokens: int = 256, temperature: float = 0.7) -> gr.Blocks:
    """The page: sidebar, top bar, Chat and Compare tabs, each built by its function below, then wired."""
    ctx = UIContext(service, max_new_tokens=max_new_tokens, temperature=temperature)
    with gr.Blocks(title="Flywheel", analytics_enabled=False) as demo:
        ui = SimpleNamespace(state=gr.State(new_chat()), pair=gr.State({}))
        vars(ui).update(vars(_sidebar()), **vars(_topbar()))
        with gr.Tabs(elem_id="tabs"):
            vars(ui).update(vars(_chat_tab()), **vars(_compare_tab()))
        _wire_chat(ui, ChatHandlers(ctx))
        _wire_sidebar(ui, ConversationHandlers(ctx), demo)
        _wire_compare(ui, ArenaHandlers(ctx))
    demo.queue(default_concurrency_limit=32)
    return demo


def _sidebar() -> SimpleNamespace:
    """Conversations, consent, privacy and delete-all, shortcuts, theme."""
    with gr.Sidebar(open=False, elem_id="sidebar"):
        gr.Markdown("### Flywheel")
        new_btn = gr.Button("+ New chat", elem_id="new-chat", size="sm")
        history = gr.Radio(label="Your conversations", choices=[], elem_id="history")
        with gr.Row(elem_id="conv-actions"):
            rename_btn = gr.Button("Rename", elem_id="rename", size="sm")
            delete_btn = gr.Button("Delete", elem_id="delete", size="sm", variant="stop")
        with gr.Group(visible=False, elem_id="rename-row") as rename_row:
            rename_box = gr.Textbox(label="New title", elem_id="rename-box", max_length=200)
            with gr.Row():
                rename_save = gr.Button("Save", elem_id="rename-save", size="sm", variant="primary")
                rename_cancel = gr.Button("Cancel", elem_id="rename-cancel", size="sm")
        with gr.Group(visible=False, elem_id="delete-row") as delete_row:
            delete_text = gr.Markdown(elem_id="delete-text")
            with gr.Row():
                delete_yes = gr.Button("Delete", elem_id="delete-yes", size="sm", variant="stop")
                delete_no = gr.Button("Cancel", elem_id="delete-no", size="sm")
        consent = gr.Checkbox(label="Use my conversations to improve the model", elem_id="consent")
        storage = gr.Markdown(elem_id="storage")
        with gr.Accordion("Privacy: what is collected, why, how to take it back", open=False, elem_id="privacy"):
            gr.Markdown(PRIVACY, elem_id="privacy-text")
            wipe_btn = gr.Button("Delete all my data", elem_id="delete-all", size="sm", variant="stop")
            with gr.Group(visible=False, elem_id="delete-all-row") as wipe_row:
                gr.Markdown("Delete your history here and ask every store to delete your data? This cannot be undone.")
                with gr.Row():
                    wipe_yes = gr.Button("Yes, delete everything", elem_id="delete-all-yes", size="sm", variant="stop")
                    wipe_no = gr.Button("Cancel", elem_id="delete-all-no", size="sm")
        with gr.Accordion("Keyboard shortcuts", open=False, elem_id="shortcuts"):
            gr.Markdown(SHORTCUTS)
        gr.Button("◐ Light / dark", elem_id="theme-toggle", size="sm")
    return SimpleNamespace(
        new_btn=new_btn,
        history=history,
        rename_btn=rename_btn,
        delete_btn=delete_btn,
        rename_row=rename_row,
        rename_box=rename_box,
        rename_save=rename_save,
        rename_cancel=rename_cancel,
        delete_row=delete_row,
        delete_text=delete_text,
        delete_yes=delete_yes,
        delete_no=delete_no,
        consent=consent,
        storage=storage,
        wipe_btn=wipe_btn,
        wipe_row=wipe_row,
        wipe_yes=wipe_yes,
        wipe_no=wipe_no,
    )


def _topbar() -> SimpleNamespace:
    """The answering model's name and card, and the API link."""
    with gr.Row(elem_id="topbar", equal_height=True):
        model_md = gr.Markdown(elem_id="model-line")
        gr.HTML(API_LINK, elem_id="api")
    with gr.Accordion("About this model", open=False, elem_id="model-card"):
        card_md = gr.Markdown(elem_id="model-card-text")
    return SimpleNamespace(model_md=model_md, card_md=card_md)


def _chat_tab() -> SimpleNamespace:
    """The chat: messages, thumbs reasons, keep-which, continue, the input row."""
    with gr.Tab("Chat", id="chat"):
        chatbot = gr.Chatbot(
            elem_id="chatbot",
            editable="user",
            feedback_options=("Like", "Dislike"),
            height="calc(100dvh - 290px)",
            min_height=260,
            sanitize_html=True,
            render_markdown=False,
            allow_tags=False,
            buttons=["copy"],
            show_label=False,
            latex_delimiters=[],
            placeholder="Ask anything. Rate answers with 👍 / 👎 to help improve the model.",
        )
        status = gr.Markdown(elem_id="status")
        with gr.Row(visible=False, elem_id="reason-row") as reason_row:
            reason = gr.Textbox(
                label="What was wrong with this answer? (optional)", elem_id="reason", scale=5, max_length=1000
            )
            report = gr.Dropdown(
                [("Don't report it", ""), ("Report: harmful", "harmful"), ("Report: wrong", "wrong"),
                 ("Report: leaks private data", "private_data")],
                value="",
                label="Report it to our reviewers?",
                elem_id="report",
                scale=2,
            )  # fmt: skip
            reason_btn = gr.Button("Send reason", elem_id="reason-send", scale=1)
        with gr.Row(visible=False, elem_id="keep-row") as keep_row:
            gr.Markdown("Which answer do you want to keep?", elem_id="keep-text")
            keep_prev = gr.Button("Keep the previous one", elem_id="keep-previous", size="sm")
            keep_new = gr.Button("Keep the new one", elem_id="keep-new", size="sm", variant="primary")
        cont_btn = gr.Button("Continue the answer ↓", elem_id="continue", size="sm", visible=False)
        with gr.Row(elem_id="input-row", equal_height=True):
            msg = gr.Textbox(
                placeholder="Message Flywheel…",
                show_label=False,
                elem_id="msg",
                scale=6,
                lines=1,
                max_lines=8,
                autofocus=True,
                container=False,
            )
            send_btn = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=70)
            stop_btn = gr.Button("■ Stop", elem_id="stop", variant="stop", scale=1, min_width=70, visible=False)
    return SimpleNamespace(
        chatbot=chatbot,
        status=status,
        reason_row=reason_row,
        reason=reason,
        report=report,
        reason_btn=reason_btn,
        keep_row=keep_row,
        keep_prev=keep_prev,
        keep_new=keep_new,
        cont_btn=cont_btn,
        msg=msg,
        send_btn=send_btn,
        stop_btn=stop_btn,
    )


def _compare_tab() -> SimpleNamespace:
    """Two anonymous versions answer the current chat; the vote reveals them."""
    with gr.Tab("Compare", id="compare") as cmp_tab:
        cmp_context = gr.Markdown(elem_id="cmp-context")
        cmp_prompt = gr.Textbox(label="Your next message", elem_id="cmp-prompt", lines=2)
        cmp_btn = gr.Button("Compare two versions", elem_id="cmp-go", variant="primary")
        with gr.Row(elem_id="cmp-panes"):
            with gr.Column(elem_classes=["fw-pane"]):
                label_a = gr.Markdown(label("a"), elem_id="cmp-a-label")
                ans_a = gr.HTML(pane(""), elem_id="cmp-a")
            with gr.Column(elem_classes=["fw-pane"]):
                label_b = gr.Markdown(label("b"), elem_id="cmp-b-label")
                ans_b = gr.HTML(pane(""), elem_id="cmp-b")
        with gr.Row():
            vote_a = gr.Button("A is better", elem_id="vote-a", interactive=False)
            vote_tie = gr.Button("Tie", elem_id="vote-tie", interactive=False)
            vote_b = gr.Button("B is better", elem_id="vote-b", interactive=False)
        cmp_status = gr.Markdown(elem_id="cmp-status")

    return SimpleNamespace(
        cmp_tab=cmp_tab,
        cmp_context=cmp_context,
        cmp_prompt=cmp_prompt,
        cmp_btn=cmp_btn,
        label_a=label_a,
        ans_a=ans_a,
        label_b=label_b,
        ans_b=ans_b,
        vote_a=vote_a,
        vote_tie=vote_tie,
        vote_b=vote_b,
        cmp_status=cmp_status,
    )


def _wire_chat(ui: SimpleNamespace, chat: ChatHandlers) -> None:
    """Send, stop, continue, retry, edit, undo, keep, thumbs and reasons."""
    chat_out = [
        ui.chatbot,
        ui.state,
        ui.msg,
        ui.status,
        ui.history,
        ui.send_btn,
        ui.stop_btn,
        ui.cont_btn,
        ui.keep_row,
        ui.reason_row,
    ]
    ui.msg.submit(chat.send, [ui.msg, ui.state], chat_out, **GENERATING)
    ui.send_btn.click(chat.send, [ui.msg, ui.state], chat_out, **GENERATING)
    ui.stop_btn.click(chat.stop, None, None, queue=False, show_progress="hidden")
    ui.cont_btn.click(chat.continue_, [ui.state], chat_out, **GENERATING)
    ui.chatbot.retry(chat.retry, [ui.state], chat_out, **GENERATING)
    ui.chatbot.edit(chat.edit, [ui.state], chat_out, **GENERATING)
    ui.chatbot.undo(chat.undo, [ui.state], chat_out)
    ui.keep_prev.click(chat.keeper("previous"), [ui.state], chat_out)
    ui.keep_new.click(chat.keeper("new"), [ui.state], chat_out)
    ui.chatbot.like(chat.like, [ui.state], [ui.state, ui.reason_row, ui.reason, ui.status, ui.chatbot])
    reason_in = [ui.reason, ui.state, ui.report]
    ui.reason_btn.click(chat.send_reason, reason_in, [ui.state, ui.reason_row, ui.reason, ui.status])
    ui.reason.submit(chat.send_reason, reason_in, [ui.state, ui.reason_row, ui.reason, ui.status])


def _wire_sidebar(ui: SimpleNamespace, side: ConversationHandlers, demo: gr.Blocks) -> None:
    """New chat, history, rename, delete, consent, delete-all, and the first load."""
    new_out = [ui.state, ui.chatbot, ui.history, ui.status, ui.reason_row, ui.cont_btn, ui.keep_row, ui.delete_row]
    ui.new_btn.click(side.start_new, None, new_out)
    ui.chatbot.clear(side.start_new, None, new_out)
    ui.history.input(side.open, [ui.history], [ui.state, ui.chatbot, ui.status, ui.cont_btn, ui.keep_row])
    ui.rename_btn.click(side.ask_rename, [ui.state], [ui.rename_row, ui.rename_box, ui.status])
    ui.rename_save.click(side.rename, [ui.rename_box, ui.state], [ui.rename_row, ui.history, ui.status])
    ui.rename_box.submit(side.rename, [ui.rename_box, ui.state], [ui.rename_row, ui.history, ui.status])
    ui.rename_cancel.click(lambda: gr.update(visible=False), None, [ui.rename_row])
    ui.delete_btn.click(side.ask_delete, [ui.state], [ui.delete_row, ui.delete_text, ui.status])
    ui.delete_yes.click(side.delete, [ui.state], [ui.delete_row, ui.state, ui.chatbot, ui.history, ui.status])
    ui.delete_no.click(lambda: gr.update(visible=False), None, [ui.delete_row])
    ui.consent.input(side.set_consent, [ui.consent], [ui.status])
    ui.wipe_btn.click(lambda: gr.update(visible=True), None, [ui.wipe_row])
    ui.wipe_no.click(lambda: gr.update(visible=False), None, [ui.wipe_row])
    ui.wipe_yes.click(side.delete_all, None, [ui.wipe_row, ui.state, ui.chatbot, ui.history, ui.consent, ui.status])
    demo.load(side.on_load, None, [ui.state, ui.chatbot, ui.history, ui.consent, ui.storage, ui.model_md, ui.card_md])


def _wire_compare(ui: SimpleNamespace, arena: ArenaHandlers) -> None:
    """Compare, then the vote."""
    ui.cmp_tab.select(context_note, [ui.state], [ui.cmp_context])
    cmp_out = [ui.pair, ui.ans_a, ui.ans_b, ui.vote_a, ui.vote_tie, ui.vote_b, ui.cmp_status, ui.label_a, ui.label_b]
    ui.cmp_btn.click(arena.compare, [ui.cmp_prompt, ui.state], cmp_out, **GENERATING)
    for btn, choice in ((ui.vote_a, "a"), (ui.vote_tie, "tie"), (ui.vote_b, "b")):
        btn.click(
            arena.voter(choice),
            [ui.pair, ui.state],
            [ui.pair, ui.label_a, ui.label_b, ui.vote_a, ui.vote_tie, ui.vote_b, ui.cmp_status, ui.state, ui.chatbot],
        )
