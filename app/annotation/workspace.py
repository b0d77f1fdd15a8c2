"""The trainer workspace at ``/train`` (issue 18): the task queue's front end, and red-team mode.

Sign in with an annotator name and the token an operator's grant printed (``flywheel roles grant``). Tabs:

- **Compare and rewrite**: the next task (``TaskQueue.next_for``): the conversation, then answers A-D with no
  version names; a rank for each (ties allowed), helpfulness / truthfulness / harmlessness 1-5, flags, "all bad",
  and an optional better answer that ranks first. Save draft, Submit, Skip with a reason. With nothing queued the
  workspace makes a task from the prompt pool: K answers from the loaded versions (two samples of one when only
  one is loaded).
- **Red team**: free adversarial chat with any loaded version, one attack at a time; tag a harm category and an
  attack type, rate your own success, optionally write the safe response, file the finding (a
  ``RedTeamFinding`` event). A finding rated 3 or more also queues a "write the safe response" task for someone
  else.

Every text is shown in a plain ``Textbox``: nothing a user, a model or a trainer wrote becomes markup here.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from pathlib import Path
from typing import Any, get_args

import gradio as gr

from app.annotation.queue import SKIP_REASONS, QueueError, Task, TaskQueue
from app.annotation.roles import RoleStore
from feedback.events import AXES, AnswerFlag, AttackType, HarmCategory, Message, RedTeamFinding, Sampling
from feedback.settings import Settings

PATH = "/train"
MAX_K = 4
POOL_FILE = Path(__file__).resolve().parents[2] / "cli" / "data" / "prompts.jsonl"
FLAGS = list(get_args(AnswerFlag))


def pool_prompts(path: Path = POOL_FILE) -> list[str]:
    """Prompts trainers may be asked about when no consented conversation is queued (the shipped prompt set)."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line)["prompt"])
    return out


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


async def make_compare_task(service: Any, queue: TaskQueue, rng: random.Random, k: int = 3) -> str:
    """A compare task from a pool prompt: K answers from the loaded versions (and samples, past their count)."""
    prompt = [{"role": "user", "content": rng.choice(pool_prompts())}]
    versions = sorted(service.loaded) or [service.default_version]
    answers = []
    for i in range(k):
        version = versions[i % len(versions)]
        text = await answer_with(service, "annotation:pool", version, prompt, seed=rng.randrange(1 << 30))
        answers.append(
            {"answer_id": f"a{i}-{uuid.uuid4().hex[:8]}", "text": text or "(empty answer)", "model_version": version}
        )
    task_id = f"pool-{uuid.uuid4().hex[:12]}"
    return queue.add(Task(task_id, "compare", prompt, answers, conversation_id=task_id))


def build_workspace(settings: Settings, service: Any, queue: TaskQueue, roles: RoleStore) -> gr.Blocks:
    rng = random.Random()

    def who(request: gr.Request):
        a = roles.get(getattr(request, "username", None) or "")
        if a is None or not a.roles:
            raise gr.Error("Your role was revoked: ask an operator.")
        return a

    def show(view) -> list[Any]:
        """Outputs for a task view (or none): header, prompt, each answer slot's visibility, then its text."""
        k = len(view.texts) if view else 0
        shown = [gr.update(visible=i < k) for i in range(MAX_K)]
        texts = [
            gr.update(value=view.texts[i], label=f"Answer {view.labels[i]}") if i < k else "" for i in range(MAX_K)
        ]
        if view is None:
            return ["Nothing to judge right now.", "", *shown, *texts]
        convo = "\n\n".join(f"{m['role']}: {m['content']}" for m in view.prompt)
        return [f"Task {view.task_id} ({view.kind})", convo, *shown, *texts]

    with gr.Blocks(title="Flywheel trainers", analytics_enabled=False) as ws:
        state = gr.State({})
        with gr.Tab("Compare and rewrite"):
            header = gr.Textbox(label="Task", interactive=False, elem_id="ws-header")
            convo = gr.Textbox(label="Conversation", interactive=False, lines=4, elem_id="ws-convo")
            groups, texts, ranks, scores, flags = [], [], [], [], []
            for i in range(MAX_K):
                with gr.Group(visible=False, elem_id=f"ws-slot-{i}") as group:
                    groups.append(group)
                    texts.append(gr.Textbox(label=f"Answer {'ABCD'[i]}", interactive=False, elem_id=f"ws-answer-{i}"))
                    with gr.Row():
                        ranks.append(
                            gr.Dropdown(
                                ["1", "2", "3", "4"],
                                value=None,
                                label="Rank (1 best; ties allowed)",
                                elem_id=f"ws-rank-{i}",
                            )
                        )
                        scores.append(
                            [
                                gr.Slider(1, 5, value=3, step=1, label=axis.capitalize(), elem_id=f"ws-{axis}-{i}")
                                for axis in AXES
                            ]
                        )
                        flags.append(gr.CheckboxGroup(FLAGS, label="Flags", elem_id=f"ws-flags-{i}"))
            all_bad = gr.Checkbox(label="All answers are bad", elem_id="ws-all-bad")
            rewrite = gr.Textbox(
                label="Your better answer (optional; it ranks first)", lines=3, max_length=8000, elem_id="ws-rewrite"
            )
            with gr.Row():
                next_btn = gr.Button("Next task", variant="primary", elem_id="ws-next")
                submit_btn = gr.Button("Submit", elem_id="ws-submit")
                draft_btn = gr.Button("Save draft", elem_id="ws-draft")
                skip_reason = gr.Dropdown(
                    list(SKIP_REASONS), label="Skip because", allow_custom_value=True, elem_id="ws-skip-reason"
                )
                skip_btn = gr.Button("Skip", elem_id="ws-skip")
            result = gr.Textbox(label="Result", interactive=False, elem_id="ws-result")
        with gr.Tab("Red team"):
            version = gr.Dropdown(choices=sorted(service.backends), label="Version", elem_id="rt-version")
            attack = gr.Textbox(label="Your attack", lines=3, max_length=8000, elem_id="rt-attack")
            send = gr.Button("Send", elem_id="rt-send")
            reply = gr.Textbox(label="The model's answer", interactive=False, lines=5, elem_id="rt-reply")
            with gr.Row():
                harm = gr.Dropdown(list(get_args(HarmCategory)), label="Harm category", elem_id="rt-harm")
                kind = gr.Dropdown(list(get_args(AttackType)), label="Attack type", elem_id="rt-kind")
                success = gr.Slider(
                    1, 5, value=1, step=1, label="How far did it get (1 refused .. 5 complied)", elem_id="rt-success"
                )
            safe = gr.Textbox(label="What it should have said (optional)", lines=2, max_length=8000, elem_id="rt-safe")
            notes = gr.Textbox(label="Notes", max_length=2000, elem_id="rt-notes")
            file_btn = gr.Button("File finding", variant="primary", elem_id="rt-file")
            rt_result = gr.Textbox(label="Result", interactive=False, elem_id="rt-result")

        slots = [header, convo, *groups, *texts]

        async def on_next(st: dict, request: gr.Request):
            a = who(request)
            view = queue.next_for(a)
            if view is None and {"trainer", "reviewer"} & set(a.roles):
                try:
                    await make_compare_task(service, queue, rng)
                except Exception as e:  # noqa: BLE001 - the workspace says what happened, the queue stays as it was
                    raise gr.Error(
                        f"Could not make a new task from the pool ({type(e).__name__}); try again shortly."
                    ) from None
                view = queue.next_for(a)
            st = {"task_id": view.task_id, "ids": view.answer_ids, "t0": time.time()} if view else {}
            draft = queue.draft(a.name, view.task_id) if view else None
            fills = _fill(draft, len(view.answer_ids) if view else 0)
            return [st, *show(view), *fills]

        def collect(st: dict, *values) -> dict[str, Any]:
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

        def on_submit(request: gr.Request, st: dict, *values):
            a = who(request)
            if not st.get("task_id"):
                return "Take a task first (Next task)."
            j = collect(st, *values)
            try:
                sent = queue.submit(a, st["task_id"], seconds=round(time.time() - st["t0"], 1), **j)
            except QueueError as e:
                return f"Not sent: {e}"
            return f"Sent ({sent.event_id[:8]}). You can change it for {queue.cfg.edit_window_s:.0f} s: submit again."

        def on_draft(request: gr.Request, st: dict, *values):
            a = who(request)
            if st.get("task_id"):
                queue.save_draft(a.name, st["task_id"], collect(st, *values))
                return "Draft saved."
            return "Take a task first (Next task)."

        def on_skip(st: dict, reason: str, request: gr.Request):
            a = who(request)
            if not st.get("task_id"):
                return "Take a task first (Next task)."
            try:
                queue.skip(a.name, st["task_id"], reason)
            except QueueError as e:
                return str(e)
            return "Skipped. Next task when you are ready."

        async def on_send(v: str, text: str, request: gr.Request):
            a = who(request)
            if "red_teamer" not in a.roles:
                raise gr.Error("Red-team mode needs the red_teamer role.")
            if not v or not (text or "").strip():
                return "Pick a version and write an attack."
            return await answer_with(service, f"redteam:{a.name}", v, [{"role": "user", "content": text}], seed=1)

        def on_file(v, text, answer, h, k, ok, safe_text, note, request: gr.Request):
            a = who(request)
            if "red_teamer" not in a.roles:
                raise gr.Error("Red-team mode needs the red_teamer role.")
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
            service.producer.emit(f)
            if f.succeeded:
                queue.add(
                    Task(
                        f"safe-{f.finding_id[:12]}",
                        "safe_response",
                        [m.model_dump() for m in f.messages],
                        [{"answer_id": "attacked", "text": f.answer, "model_version": f.model_version}],
                        conversation_id=f.conversation_id,
                        author=a.name,
                        priority=1.0 + f.success / 5,
                    )
                )
            return f"Filed ({f.finding_id[:8]})." + (
                " A safe-response task is queued for someone else." if f.succeeded else ""
            )

        inputs = [*ranks, *(s for row in scores for s in row), *flags, all_bad, rewrite]
        next_btn.click(on_next, [state], [state, *slots, *inputs])
        submit_btn.click(on_submit, [state, *inputs], [result])
        draft_btn.click(on_draft, [state, *inputs], [result])
        skip_btn.click(on_skip, [state, skip_reason], [result])
        send.click(on_send, [version, attack], [reply])
        file_btn.click(on_file, [version, attack, reply, harm, kind, success, safe, notes], [rt_result])
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
