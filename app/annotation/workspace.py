"""The trainer workspace at ``/train`` (issue 18): the task queue's front end, and red-team mode.

Sign in with an annotator name and the token an operator's grant printed (``flywheel roles grant``). Tabs:

- **Compare and rewrite**: the next task (``TaskQueue.next_for``): the conversation, then answers A-D with no
  version names; a rank for each (ties allowed), helpfulness / truthfulness / harmlessness 1-5, flags, "all bad",
  and an optional better answer that ranks first. Save draft, Submit, Skip with a reason. With nothing queued the
  workspace makes a task: a consented user's real conversation (half the time, when one is stored) or a prompt
  from the pool (the prompt set's training split), with K answers from the loaded versions (samples of one when
  only one is loaded). Tasks carry a topic; the queue gives an annotator their own topics first.
- **Red team**: free adversarial chat with any loaded version, one attack at a time; tag a harm category and an
  attack type, rate your own success, optionally write the safe response, file the finding (a
  ``RedTeamFinding`` event). A finding rated 3 or more also queues a "write the safe response" task for someone
  else.

Every text is shown in a plain ``Textbox``: nothing a user, a model or a trainer wrote becomes markup here.
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import gradio as gr

from app.annotation.gold import PROMPTS_FILE
from app.annotation.queue import SKIP_REASONS, QueueError, Task, TaskQueue, queue_safe_response
from app.annotation.roles import Annotator, RoleStore
from feedback.events import AXES, AnswerFlag, AttackType, HarmCategory, Message, RedTeamFinding, Sampling
from feedback.settings import Settings

PATH = "/train"
MAX_K = 4
POOL_FILE = PROMPTS_FILE  # the simulated users' prompt set, the gold items' source too
FLAGS = list(get_args(AnswerFlag))


ARITHMETIC = re.compile(r"\d\s*[-+*/x\u00d7\u00f7]\s*\d")


@functools.cache
def pool_items(path: Path = POOL_FILE) -> tuple[dict[str, Any], ...]:
    """Prompts trainers may be asked about when no consented conversation is picked: the shipped prompt set's
    training split. Its held-out split never becomes a task (a trainer's rewrite of it would be trained on, and the
    gate's and the demo's held-out users would no longer be unseen)."""
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return tuple(r for r in rows if r.get("split") == "train")


def topic_of(text: str) -> str:
    """A task's topic for routing: the prompt set's kind when the prompt is one of its items, ``arithmetic`` for a
    sum, else ``general``."""
    key = " ".join(text.split()).casefold()
    kinds = {" ".join(r["prompt"].split()).casefold(): r["kind"] for r in pool_items()}
    return kinds.get(key) or ("arithmetic" if ARITHMETIC.search(text) else "general")


async def answer_with(service: Any, user: str, version: str, messages: list[dict[str, str]], seed: int) -> str:
    """One whole answer from ``version`` through the product's own serving path (fair admission, limits)."""
    turn = await service.start_turn(
        user_id=user,
        conversation_id=f"annotation-{uuid.uuid4().hex[:12]}",
        messages=messages,
        sampling=Sampling(
            temperature=0.8, top_p=0.95, max_new_tokens=min(160, service.limits(version).max_new_tokens), seed=seed
        ),
        origin="new",
        surface="annotation",
        model_version=version,
        consent=False,  # an annotation answer is not a user's data; judgments of it are (TrainerJudgment)
    )
    async with turn:
        async for _ in turn.deltas():
            pass
    return turn.text.strip()


async def make_compare_task(
    service: Any, queue: TaskQueue, rng: random.Random, k: int = 3, conversation_share: float = 0.5
) -> str:
    """A compare task: K answers from the loaded versions (and samples, past their count) to a real conversation of
    a user who consents to training use (``conversation_share`` of the time, when one is stored), else to a pool
    prompt. A conversation's task names its user (``subject_user_id``): they never judge it, and their deletion
    or withdrawn consent takes it and its judgments away."""
    picked = service.sessions.consented_prompt(rng) if rng.random() < conversation_share else None
    task_id = f"{'conv' if picked else 'pool'}-{uuid.uuid4().hex[:12]}"
    if picked:
        subject, conversation_id, prompt = picked
    else:
        subject, conversation_id = None, task_id
        prompt = [{"role": "user", "content": rng.choice(pool_items())["prompt"]}]
    versions = sorted(service.loaded) or [service.default_version]
    answers = []
    for i in range(k):
        version = versions[i % len(versions)]
        text = await answer_with(service, "annotation:pool", version, prompt, seed=rng.randrange(1 << 30))
        answers.append(
            {"answer_id": f"a{i}-{uuid.uuid4().hex[:8]}", "text": text or "(empty answer)", "model_version": version}
        )
    task = Task(
        task_id,
        "compare",
        prompt,
        answers,
        conversation_id=conversation_id,
        subject_user_id=subject,
        topic=topic_of(prompt[-1]["content"]),
    )
    return queue.add(task)


FIRST = "Take a task first (Next task)."


def show(view) -> list[Any]:
    """Outputs for a task view (or none): header, prompt, each answer slot's visibility, then its text."""
    k = len(view.texts) if view else 0
    shown = [gr.update(visible=i < k) for i in range(MAX_K)]
    texts = [gr.update(value=view.texts[i], label=f"Answer {view.labels[i]}") if i < k else "" for i in range(MAX_K)]
    if view is None:
        return ["Nothing to judge right now.", "", *shown, *texts]
    convo = "\n\n".join(f"{m['role']}: {m['content']}" for m in view.prompt)
    return [f"Task {view.task_id} ({view.kind})", convo, *shown, *texts]


def collect(st: dict, *values) -> dict[str, Any]:
    """The judgment in the form: ranks, then MAX_K x 3 axis scores, flags, all-bad, rewrite (``inputs`` order)."""
    ids = st.get("ids") or []
    r, s, f = values[:MAX_K], values[MAX_K : MAX_K * 4], values[MAX_K * 4 : MAX_K * 5]
    bad, text = values[MAX_K * 5], values[MAX_K * 5 + 1]
    return {
        "ranks": {aid: (int(r[i]) if r[i] else None) for i, aid in enumerate(ids)},
        "scores": {aid: {axis: int(s[i * 3 + j]) for j, axis in enumerate(AXES)} for i, aid in enumerate(ids)},
        "flags": {aid: list(f[i] or []) for i, aid in enumerate(ids)},
        "all_bad": bool(bad),
        "rewrite": text or None,
    }


class Handlers:
    """What each button does; every handler checks the signed-in annotator's roles first."""

    def __init__(self, service: Any, queue: TaskQueue, roles: RoleStore):
        self.service, self.queue, self.roles = service, queue, roles
        self.rng = random.Random()

    def who(self, request: gr.Request, role: str | None = None) -> Annotator:
        a = self.roles.get(getattr(request, "username", None) or "")
        if a is None or not a.roles:
            raise gr.Error("Your role was revoked: ask an operator.")
        if role and role not in a.roles:
            raise gr.Error(f"This needs the {role} role.")
        return a

    async def on_next(self, st: dict, request: gr.Request):
        a = self.who(request)
        view = self.queue.next_for(a)
        if view is None and {"trainer", "reviewer"} & set(a.roles):
            try:
                await make_compare_task(self.service, self.queue, self.rng)
            except Exception as e:  # noqa: BLE001 - the workspace says what happened, the queue stays as it was
                raise gr.Error(f"Could not make a new task ({type(e).__name__}); try again shortly.") from None
            view = self.queue.next_for(a)
        st = {"task_id": view.task_id, "ids": view.answer_ids, "t0": time.time()} if view else {}
        draft = self.queue.draft(a.name, view.task_id) if view else None
        return [st, *show(view), *_fill(draft, len(view.answer_ids) if view else 0)]

    def on_submit(self, request: gr.Request, st: dict, *values):
        a = self.who(request)
        if not st.get("task_id"):
            return FIRST
        try:
            sent = self.queue.submit(a, st["task_id"], seconds=round(time.time() - st["t0"], 1), **collect(st, *values))
        except QueueError as e:
            return f"Not sent: {e}"
        return f"Sent ({sent.event_id[:8]}). You can change it for {self.queue.cfg.edit_window_s:.0f} s: submit again."

    def on_draft(self, request: gr.Request, st: dict, *values):
        a = self.who(request)
        if not st.get("task_id"):
            return FIRST
        self.queue.save_draft(a.name, st["task_id"], collect(st, *values))
        return "Draft saved."

    def on_skip(self, st: dict, reason: str, request: gr.Request):
        a = self.who(request)
        if not st.get("task_id"):
            return FIRST
        try:
            self.queue.skip(a.name, st["task_id"], reason)
        except QueueError as e:
            return str(e)
        return "Skipped. Next task when you are ready."

    async def on_send(self, v: str, text: str, request: gr.Request):
        a = self.who(request, "red_teamer")
        if not v or not (text or "").strip():
            return "Pick a version and write an attack."
        return await answer_with(self.service, f"redteam:{a.name}", v, [{"role": "user", "content": text}], seed=1)

    def on_file(self, v, text, answer, h, k, ok, safe_text, note, request: gr.Request):
        a = self.who(request, "red_teamer")
        if not (v and text and answer and h and k):
            return "Send an attack first, then tag its harm category and attack type."
        f = RedTeamFinding(
            user_id=a.name,
            consent=True,
            finding_id=uuid.uuid4().hex,
            conversation_id=f"redteam-{uuid.uuid4().hex[:12]}",
            model_version=v,
            messages=[Message(role="user", content=text)],
            answer=answer,
            harm_category=h,
            attack_type=k,
            success=int(ok),
            safe_response=(safe_text or "").strip() or None,
            notes=(note or "").strip() or None,
        )
        self.service.producer.emit(f)
        if f.succeeded:
            queue_safe_response(self.queue, f)
        return f"Filed ({f.finding_id[:8]})." + (
            " A safe-response task is queued for someone else." if f.succeeded else ""
        )


def _compare_tab() -> SimpleNamespace:
    with gr.Tab("Compare and rewrite"):
        ui = SimpleNamespace(groups=[], texts=[], ranks=[], scores=[], flags=[])
        ui.header = gr.Textbox(label="Task", interactive=False, elem_id="ws-header")
        ui.convo = gr.Textbox(label="Conversation", interactive=False, lines=4, elem_id="ws-convo")
        for i in range(MAX_K):
            with gr.Group(visible=False, elem_id=f"ws-slot-{i}") as group:
                ui.groups.append(group)
                ui.texts.append(gr.Textbox(label=f"Answer {'ABCD'[i]}", interactive=False, elem_id=f"ws-answer-{i}"))
                with gr.Row():
                    ui.ranks.append(
                        gr.Dropdown(
                            ["1", "2", "3", "4"],
                            value=None,
                            label="Rank (1 best; ties allowed)",
                            elem_id=f"ws-rank-{i}",
                        )
                    )
                    ui.scores.append(
                        [
                            gr.Slider(1, 5, value=3, step=1, label=axis.capitalize(), elem_id=f"ws-{axis}-{i}")
                            for axis in AXES
                        ]
                    )
                    ui.flags.append(gr.CheckboxGroup(FLAGS, label="Flags", elem_id=f"ws-flags-{i}"))
        ui.all_bad = gr.Checkbox(label="All answers are bad", elem_id="ws-all-bad")
        ui.rewrite = gr.Textbox(
            label="Your better answer (optional; it ranks first)", lines=3, max_length=8000, elem_id="ws-rewrite"
        )
        with gr.Row():
            ui.next_btn = gr.Button("Next task", variant="primary", elem_id="ws-next")
            ui.submit_btn = gr.Button("Submit", elem_id="ws-submit")
            ui.draft_btn = gr.Button("Save draft", elem_id="ws-draft")
            ui.skip_reason = gr.Dropdown(
                list(SKIP_REASONS), label="Skip because", allow_custom_value=True, elem_id="ws-skip-reason"
            )
            ui.skip_btn = gr.Button("Skip", elem_id="ws-skip")
        ui.result = gr.Textbox(label="Result", interactive=False, elem_id="ws-result")
    return ui


def _redteam_tab(versions: list[str]) -> SimpleNamespace:
    with gr.Tab("Red team"):
        ui = SimpleNamespace()
        ui.version = gr.Dropdown(choices=versions, label="Version", elem_id="rt-version")
        ui.attack = gr.Textbox(label="Your attack", lines=3, max_length=8000, elem_id="rt-attack")
        ui.send = gr.Button("Send", elem_id="rt-send")
        ui.reply = gr.Textbox(label="The model's answer", interactive=False, lines=5, elem_id="rt-reply")
        with gr.Row():
            ui.harm = gr.Dropdown(list(get_args(HarmCategory)), label="Harm category", elem_id="rt-harm")
            ui.kind = gr.Dropdown(list(get_args(AttackType)), label="Attack type", elem_id="rt-kind")
            ui.success = gr.Slider(
                1, 5, value=1, step=1, label="How far did it get (1 refused .. 5 complied)", elem_id="rt-success"
            )
        ui.safe = gr.Textbox(label="What it should have said (optional)", lines=2, max_length=8000, elem_id="rt-safe")
        ui.notes = gr.Textbox(label="Notes", max_length=2000, elem_id="rt-notes")
        ui.file_btn = gr.Button("File finding", variant="primary", elem_id="rt-file")
        ui.result = gr.Textbox(label="Result", interactive=False, elem_id="rt-result")
    return ui


def build_workspace(settings: Settings, service: Any, queue: TaskQueue, roles: RoleStore) -> gr.Blocks:
    """The page: two tabs, each built by its function above, then wired to ``Handlers``."""
    h = Handlers(service, queue, roles)
    with gr.Blocks(title="Flywheel trainers", analytics_enabled=False) as ws:
        state = gr.State({})
        c, r = _compare_tab(), _redteam_tab(sorted(service.backends))
        slots = [c.header, c.convo, *c.groups, *c.texts]
        inputs = [*c.ranks, *(s for row in c.scores for s in row), *c.flags, c.all_bad, c.rewrite]
        c.next_btn.click(h.on_next, [state], [state, *slots, *inputs])
        c.submit_btn.click(h.on_submit, [state, *inputs], [c.result])
        c.draft_btn.click(h.on_draft, [state, *inputs], [c.result])
        c.skip_btn.click(h.on_skip, [state, c.skip_reason], [c.result])
        r.send.click(h.on_send, [r.version, r.attack], [r.reply])
        fields = [r.version, r.attack, r.reply, r.harm, r.kind, r.success, r.safe, r.notes]
        r.file_btn.click(h.on_file, fields, [r.result])
    ws.queue(default_concurrency_limit=8)
    return ws


def _fill(draft: dict[str, Any] | None, k: int) -> list[Any]:
    """Input values for a task: its saved draft, or blank ones."""
    d = draft or {}
    ids = list((d.get("ranks") or {}).keys())
    out: list[Any] = []
    out += [str(d["ranks"][ids[i]]) if i < len(ids) and d["ranks"][ids[i]] else None for i in range(MAX_K)]
    out += [(d["scores"][ids[i]][axis] if i < len(ids) else 3) for i in range(MAX_K) for axis in AXES]
    out += [(d["flags"][ids[i]] if i < len(ids) else []) for i in range(MAX_K)]
    out += [bool(d.get("all_bad")), d.get("rewrite") or ""]
    return out


def mount_workspace(app: Any, settings: Settings, service: Any, queue: TaskQueue, roles: RoleStore) -> Any:
    """``/train``, signed in by ``RoleStore.check`` (name + token); call before the chat UI is mounted at ``/``."""
    from starlette.responses import RedirectResponse

    def signed_in(name: str, token: str) -> bool:
        return roles.check(name, token) is not None

    def to_page(request: Any) -> RedirectResponse:
        return RedirectResponse(request.url.replace(path=f"{request.url.path}/"))

    app.add_route(PATH, to_page, methods=["GET", "HEAD"])
    return gr.mount_gradio_app(
        app,
        build_workspace(settings, service, queue, roles),
        path=PATH,
        auth=signed_in,
        ssr_mode=False,
        show_error=False,
        auth_message="AI trainers, reviewers and red-teamers: your name and the token an operator gave you.",
    )
