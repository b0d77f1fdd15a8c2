"""Where everything sits and which handler each control calls. No logic here: handlers live in
``chat.py`` (the chat tab), ``conversations.py`` (the sidebar), ``arena.py`` (the Compare tab)."""

from __future__ import annotations

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


def build_ui(service: ChatService, *, max_new_tokens: int = 256, temperature: float = 0.7) -> gr.Blocks:
    ctx = UIContext(service, max_new_tokens=max_new_tokens, temperature=temperature)
    chat, side, arena = ChatHandlers(ctx), ConversationHandlers(ctx), ArenaHandlers(ctx)

    with gr.Blocks(title="Flywheel", analytics_enabled=False) as demo:
        state = gr.State(new_chat())
        pair = gr.State({})
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
                    gr.Markdown(
                        "Delete your history here and ask every store to delete your data? This cannot be undone."
                    )
                    with gr.Row():
                        wipe_yes = gr.Button(
                            "Yes, delete everything", elem_id="delete-all-yes", size="sm", variant="stop"
                        )
                        wipe_no = gr.Button("Cancel", elem_id="delete-all-no", size="sm")
            with gr.Accordion("Keyboard shortcuts", open=False, elem_id="shortcuts"):
                gr.Markdown(SHORTCUTS)
            gr.Button("◐ Light / dark", elem_id="theme-toggle", size="sm")
        with gr.Row(elem_id="topbar", equal_height=True):
            model_md = gr.Markdown(elem_id="model-line")
            gr.HTML(API_LINK, elem_id="api")
        with gr.Accordion("About this model", open=False, elem_id="model-card"):
            card_md = gr.Markdown(elem_id="model-card-text")
        with gr.Tabs(elem_id="tabs"):
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

        # ---- wiring -------------------------------------------------------------------------------
        chat_out = [chatbot, state, msg, status, history, send_btn, stop_btn, cont_btn, keep_row, reason_row]
        gen = dict(concurrency_limit=None, show_progress="hidden")
        msg.submit(chat.send, [msg, state], chat_out, **gen)
        send_btn.click(chat.send, [msg, state], chat_out, **gen)
        stop_btn.click(chat.stop, None, None, queue=False, show_progress="hidden")
        cont_btn.click(chat.continue_, [state], chat_out, **gen)
        chatbot.retry(chat.retry, [state], chat_out, **gen)
        chatbot.edit(chat.edit, [state], chat_out, **gen)
        chatbot.undo(chat.undo, [state], chat_out)
        keep_prev.click(chat.keeper("previous"), [state], chat_out)
        keep_new.click(chat.keeper("new"), [state], chat_out)
        chatbot.like(chat.like, [state], [state, reason_row, reason, status, chatbot])
        reason_btn.click(chat.send_reason, [reason, state], [state, reason_row, reason, status])
        reason.submit(chat.send_reason, [reason, state], [state, reason_row, reason, status])

        new_out = [state, chatbot, history, status, reason_row, cont_btn, keep_row, delete_row]
        new_btn.click(side.start_new, None, new_out)
        chatbot.clear(side.start_new, None, new_out)
        history.input(side.open, [history], [state, chatbot, status, cont_btn, keep_row])
        rename_btn.click(side.ask_rename, [state], [rename_row, rename_box, status])
        rename_save.click(side.rename, [rename_box, state], [rename_row, history, status])
        rename_box.submit(side.rename, [rename_box, state], [rename_row, history, status])
        rename_cancel.click(lambda: gr.update(visible=False), None, [rename_row])
        delete_btn.click(side.ask_delete, [state], [delete_row, delete_text, status])
        delete_yes.click(side.delete, [state], [delete_row, state, chatbot, history, status])
        delete_no.click(lambda: gr.update(visible=False), None, [delete_row])
        consent.input(side.set_consent, [consent], [status])
        wipe_btn.click(lambda: gr.update(visible=True), None, [wipe_row])
        wipe_no.click(lambda: gr.update(visible=False), None, [wipe_row])
        wipe_yes.click(side.delete_all, None, [wipe_row, state, chatbot, history, consent, status])

        cmp_tab.select(context_note, [state], [cmp_context])
        cmp_out = [pair, ans_a, ans_b, vote_a, vote_tie, vote_b, cmp_status, label_a, label_b]
        cmp_btn.click(arena.compare, [cmp_prompt, state], cmp_out, **gen)
        for btn, choice in ((vote_a, "a"), (vote_tie, "tie"), (vote_b, "b")):
            btn.click(
                arena.voter(choice),
                [pair, state],
                [pair, label_a, label_b, vote_a, vote_tie, vote_b, cmp_status, state, chatbot],
            )
        demo.load(side.on_load, None, [state, chatbot, history, consent, storage, model_md, card_md])
    demo.queue(default_concurrency_limit=32)
    return demo
