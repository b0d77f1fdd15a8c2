"""``flywheel simulate``: simulated users chat with the running product through its PUBLIC API (never internal
calls) and rate the answers, so the loop (events -> warehouse -> curated sets -> training -> release) has data
to work on without real users, and so a release can be judged on ratings that come from a known taste.

    flywheel simulate --users 8 --minutes 5
    flywheel simulate --users 4 --turns 3 --json
    flywheel simulate --prompts heldout --turns 5 --json    # evaluation users: only held-out prompts

Substance first. Every prompt (``cli/prompt_set.py``) carries what a right answer must hold: accepted answers,
key facts, verifiable instructions, or a refusal for a harmful request. A wrong, empty or off-topic answer, a
harmful request answered or a harmless one refused, is disliked whatever its form; people miss some errors
(each user has a miss rate of 10-20%, drawn once). Each user also has a hidden form taste (``Taste.draw``): a
majority want concise answers, others dislike lists, want the answer first or want a greeting; an answer cut
at the token limit looks unfinished to everyone. A right answer in a disliked form is liked less, but form never
outweighs correctness: the hidden utility of an answer is +1 if right, -1 if wrong, minus 0.3 per complaint
(at most 0.9). Thumbs come from the utility as the user perceives it (with their misses and Gaussian noise);
the stats report the TRUE utility and correctness per answer, per user and per version, so a change can be
credited to correctness or to form.

Per question a user: asks (a new conversation); sometimes asks for a second answer and compares the two
(side by side, pinned to the other live release when the plan has two, so side-by-side wins per version are
measured); gives thumbs with a reason (the substance first: "Wrong answer", "Didn't follow the instructions:
...", "Should have refused"); after a thumbs-down sometimes regenerates and rates again. Some users withdraw
consent part-way (``X-Flywheel-Consent: 0``) and some ask for deletion (``POST /v1/users/me/delete``).
Training users ask only ``train`` prompts; ``--prompts heldout`` users only held-out ones.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import httpx
import typer

from cli.prompt_set import PROMPTS_FILE, PromptItem, PromptSplit, load_prompt_set, load_prompts
from cli.sim_stats import AnswerRecord, SimStats, UserStats, VersionStats
from feedback.settings import get_settings

__all__ = ["PROMPTS_FILE", "SimConfig", "SimStats", "Taste", "VersionStats", "load_prompts", "run_simulation"]
GREETINGS = ("hi", "hello", "hey", "greetings", "good morning", "good day")
PREAMBLES = (
    "sure",
    "certainly",
    "of course",
    "great question",
    "absolutely",
    "i'd be happy",
    "i would be happy",
    "okay",
    "ok,",
    "well,",
    "as an ai",
)
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
FORM_STEP = 0.3  # utility lost per form complaint ...
FORM_CAP = 0.9  # ... at most: a right answer in the worst form (>= 0.1) still beats a wrong one (<= -1)


# ---------------------------------------------------------------------------------------------------------
# Taste: what one simulated person likes, and how they judge an answer
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Taste:
    name: str
    max_words: int | None = None  # concise: answers longer than this are "too long"
    no_lists: bool = False
    answer_first: bool = False
    wants_greeting: bool = False
    noise: float = 0.25  # standard deviation of the judgement noise
    threshold: float = 0.5  # perceived utility above this is a thumbs up
    miss_rate: float = 0.15  # share of wrong answers this person takes for right ones

    @classmethod
    def draw(cls, rng: random.Random) -> Taste:
        """The population: 60% concise, 15% no lists, 15% answer first, 10% want a greeting; misses 10-20%."""
        u = rng.random()
        if u < 0.60:
            t = cls("concise", max_words=rng.choice((25, 30, 35, 40)))
        elif u < 0.75:
            t = cls("no_lists", no_lists=True, max_words=80)
        elif u < 0.90:
            t = cls("answer_first", answer_first=True, max_words=60)
        else:
            t = cls("greeting", wants_greeting=True)
        return replace(t, miss_rate=round(rng.uniform(0.10, 0.20), 3))

    def complaints(self, answer: str, finish: str) -> list[str]:
        """What this person dislikes about an answer's FORM, most important first (empty: nothing)."""
        text = answer.strip()
        low = text.lower()
        out = []
        if self.max_words is not None and len(text.split()) > self.max_words:
            out.append("Too long, get to the point")
        if finish == "length":
            out.append("Cut off in the middle")
        if self.no_lists and _LIST_LINE.search(text):
            out.append("No lists please, just answer in plain sentences")
        if self.answer_first and low.startswith(PREAMBLES):
            out.append("Answer first, skip the preamble")
        if self.wants_greeting and not low.startswith(GREETINGS):
            out.append("A friendly greeting would be nice")
        if not text:
            out.append("Empty answer")
        return out

    def value(self, correct: bool, answer: str, finish: str) -> float:
        """The hidden utility, before noise: substance (+1 right, -1 wrong) minus what the form costs."""
        return (1.0 if correct else -1.0) - min(FORM_STEP * len(self.complaints(answer, finish)), FORM_CAP)

    def utility(self, answer: str, finish: str, rng: random.Random, correct: bool = True) -> float:
        """The utility as felt at one look: ``value`` plus Gaussian noise."""
        return self.value(correct, answer, finish) + rng.gauss(0.0, self.noise)


@dataclass(frozen=True)
class SimConfig:
    users: int = 4
    turns: int = 0  # questions per user; 0 = until the time is up
    minutes: float = 0.0  # 0 = until every user asked ``turns`` questions
    max_tokens: int = 48
    temperature: float = 0.8
    consent_rate: float = 0.9
    compare_rate: float = 0.3
    regenerate_rate: float = 0.3
    withdraw_rate: float = 0.0
    delete_rate: float = 0.0
    prompts: PromptSplit = "train"
    seed: int = 0
    api_key: str = ""
    user_prefix: str = "sim"
    # 0: each simulated person keeps one user id. n: a person comes back as a new visitor (a fresh user id, the same
    # taste) every n questions, as a product's traffic is many people asking a little. A release routes by user id,
    # so six held-out people with one id each all landed in production's half of a 50% canary (1 in 32 runs; the
    # demo test in a full run on 2026-12-05) and the canary got no rating in 8 minutes; visitors split by the release's
    # share.
    questions_per_visit: int = 0
    busy_patience_s: float = 60.0  # how long a user keeps retrying a busy (429) server before counting an error


@dataclass
class Answer:
    turn_id: str
    text: str
    finish: str
    version: str
    item: PromptItem | None = None
    correct: bool = False  # judged against the prompt's check when it arrives
    utility: float = 0.0  # the asker's hidden utility (no noise, no missed errors)
    reason: str = ""  # what is wrong with it, when it is wrong
    record: int = -1  # its row in ``SimStats.records``


def visitor_id(person: str, asked: int, questions_per_visit: int) -> str:
    """The user id under which ``person`` asks their next question, after ``asked`` of them (``questions_per_visit``:
    0 = always the person's own id)."""
    visit = asked // questions_per_visit if questions_per_visit else 0
    return f"{person}-v{visit}" if visit else person


class SimUser:
    """One simulated person with a hidden taste, talking to the API over its own HTTP client."""

    def __init__(self, client: httpx.Client, cfg: SimConfig, idx: int, prompts: list[PromptItem]):
        self.client = client
        self.cfg = cfg
        self.rng = random.Random(f"{cfg.seed}:{idx}")
        self.person = f"{cfg.user_prefix}-{cfg.seed}-{idx}"  # who: stats and records are per person
        self.user = self.person  # the user id the app sees: a fresh one per visit (``questions_per_visit``)
        self.asked = 0
        self.taste = Taste.draw(self.rng)
        self.consent = self.rng.random() < cfg.consent_rate
        self.prompts = prompts
        self.stats = SimStats(users=1, tastes={self.taste.name: 1})
        self.stats.per_user[self.person] = UserStats(taste=self.taste.name, miss_rate=self.taste.miss_rate)

    def _headers(self, conv: str | None = None) -> dict[str, str]:
        h = {"X-Flywheel-User": self.user, "X-Flywheel-Consent": "1" if self.consent else "0"}
        if conv:
            h["X-Flywheel-Conversation"] = conv
        if self.cfg.api_key:
            h["Authorization"] = f"Bearer {self.cfg.api_key}"
        return h

    def ask(self, conv: str, item: PromptItem, model: str = "flywheel") -> Answer | None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": item.prompt}],
            "max_tokens": self.cfg.max_tokens,
            "temperature": self.cfg.temperature,
        }
        give_up = time.monotonic() + self.cfg.busy_patience_s
        while time.monotonic() < give_up:
            try:
                r = self.client.post("/v1/chat/completions", json=body, headers=self._headers(conv))
            except httpx.HTTPError as e:
                r = None
                self.stats.note_error(f"chat: {type(e).__name__}")
            if r is not None and r.status_code == 429:
                self.stats.busy_retries += 1
                time.sleep(0.25 + self.rng.random() * 0.5)
                continue
            if r is None or r.status_code != 200:
                self.stats.errors += 1
                if r is not None:
                    self.stats.note_error(f"chat: HTTP {r.status_code} {r.text[:160]}")
                self.stats.version(r.headers.get("x-flywheel-model-version", "?") if r is not None else "?").errors += 1
                return None
            d = r.json()
            self.stats.turns += 1
            a = Answer(d["id"], d["choices"][0]["message"]["content"], d["choices"][0]["finish_reason"], d["model"])
            self.stats.version(a.version).answers += 1
            self.stats.per_user[self.person].answers += 1
            return self.assess(a, item)
        self.stats.errors += 1
        self.stats.note_error(f"chat: still busy (HTTP 429) after {self.cfg.busy_patience_s:g} s of retries")
        return None

    def assess(self, a: Answer, item: PromptItem) -> Answer:
        """Check the answer against its prompt and record its truth and hidden utility."""
        verdict = item.judge(a.text)
        a.item, a.correct, a.reason = item, verdict.correct, verdict.reason
        a.utility = self.taste.value(a.correct, a.text, a.finish)
        a.record = len(self.stats.records)
        self.stats.record(AnswerRecord(self.person, item.id, item.kind, a.version, a.correct, round(a.utility, 4)))
        return a

    def perceive(self, a: Answer) -> tuple[float, str]:
        """The utility this person feels at one look (they miss some errors), and what they would say first."""
        seen_right = a.correct or self.rng.random() < self.taste.miss_rate
        felt = self.taste.utility(a.text, a.finish, self.rng, correct=seen_right)
        if not seen_right:
            return felt, a.reason
        complaints = self.taste.complaints(a.text, a.finish)
        return felt, complaints[0] if complaints else "Not what I wanted"

    def _feedback(self, payload: dict) -> bool:
        try:
            r = self.client.post("/v1/feedback", json=payload, headers=self._headers())
        except httpx.HTTPError as e:
            self.stats.errors += 1
            self.stats.note_error(f"feedback: {type(e).__name__}")
            return False
        if r.status_code >= 300:
            self.stats.errors += 1
            self.stats.note_error(f"feedback: HTTP {r.status_code} {r.text[:160]}")
            return False
        return True

    def thumbs(self, a: Answer) -> bool:
        felt, reason = self.perceive(a)
        liked = felt > self.taste.threshold
        payload = {"turn_id": a.turn_id, "rating": "up" if liked else "down"}
        if not liked:
            payload["reason"] = reason
        if self._feedback(payload):
            self.stats.thumbs += 1
            for vs in (self.stats.version(a.version), self.stats.per_user[self.person]):
                vs.thumbs += 1
                vs.up += liked
            if a.record >= 0:
                self.stats.records[a.record] = replace(self.stats.records[a.record], liked=liked)
        return liked

    def compare(self, a: Answer, b: Answer) -> None:
        (ua, _), (ub, _) = self.perceive(a), self.perceive(b)
        verdict = "tie" if abs(ua - ub) < 0.15 else ("a" if ua > ub else "b")
        if self._feedback({"turn_id": a.turn_id, "other_turn_id": b.turn_id, "rating": verdict}):
            self.stats.comparisons += 1
            if a.version != b.version:
                for x, won in ((a, verdict == "a"), (b, verdict == "b")):
                    vs = self.stats.version(x.version)
                    vs.side_by_side += 1
                    vs.wins += won
                    vs.ties += verdict == "tie"

    def other_version(self, mine: str) -> str:
        """Another release in the current plan (from the public /v1/models), for a side-by-side; else 'flywheel'."""
        try:
            models = self.client.get("/v1/models", headers=self._headers()).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            return "flywheel"
        live = [m["id"] for m in models if m.get("in_release_plan") and m["id"] != mine]
        return live[0] if live else "flywheel"

    def one_question(self) -> None:
        self.user = visitor_id(self.person, self.asked, self.cfg.questions_per_visit)
        self.asked += 1
        item = self.rng.choice(self.prompts)
        conv = uuid.uuid4().hex
        a = self.ask(conv, item)
        if a is None:
            return
        if self.rng.random() < self.cfg.compare_rate:
            b = self.ask(conv, item, model=self.other_version(a.version))
            if b is not None:
                self.compare(a, b)
        liked = self.thumbs(a)
        if not liked and self.rng.random() < self.cfg.regenerate_rate:
            again = self.ask(conv, item)
            if again is not None:
                self.stats.regenerations += 1
                self.thumbs(again)

    def delete_my_data(self) -> None:
        """Ask for deletion of everything about this user (``POST /v1/users/me/delete``), then leave."""
        try:
            r = self.client.post("/v1/users/me/delete", json={}, headers=self._headers())
        except httpx.HTTPError as e:
            self.stats.errors += 1
            self.stats.note_error(f"delete: {type(e).__name__}")
            return
        if r.status_code >= 300:
            self.stats.errors += 1
            self.stats.note_error(f"delete: HTTP {r.status_code} {r.text[:160]}")
        else:
            self.stats.deletions += 1

    def withdraw_consent(self) -> None:
        """Say no from now on: the next request carries ``X-Flywheel-Consent: 0`` (the app emits the revocation)."""
        self.consent = False
        self.stats.consent_withdrawn += 1
        self.ask(uuid.uuid4().hex, self.rng.choice(self.prompts))


def _run_user(base_url: str, cfg: SimConfig, idx: int, prompts: list[PromptItem], deadline: float | None) -> SimStats:
    with httpx.Client(base_url=base_url, timeout=300) as client:
        u = SimUser(client, cfg, idx, prompts)
        withdraw_after = (
            u.rng.randint(1, max(1, cfg.turns or 3)) if u.consent and u.rng.random() < cfg.withdraw_rate else None
        )
        delete_after = u.rng.randint(1, max(1, cfg.turns or 3)) if u.rng.random() < cfg.delete_rate else None
        asked = 0
        while (not cfg.turns or asked < cfg.turns) and (deadline is None or time.monotonic() < deadline):
            u.one_question()
            asked += 1
            if withdraw_after is not None and asked == withdraw_after:
                u.withdraw_consent()
                break
            if delete_after is not None and asked == delete_after:
                u.delete_my_data()
                break
        return u.stats


def run_simulation(base_url: str, cfg: SimConfig) -> SimStats:
    """Run ``cfg.users`` users concurrently against the app at ``base_url``; returns the merged stats."""
    if not cfg.turns and not cfg.minutes:
        raise ValueError("give --turns or --minutes (or both), else the simulation never ends")
    prompts = load_prompt_set(cfg.prompts)
    deadline = time.monotonic() + cfg.minutes * 60 if cfg.minutes else None
    total = SimStats()
    t0 = time.monotonic()
    with ThreadPoolExecutor(cfg.users) as pool:
        for f in [pool.submit(_run_user, base_url, cfg, i, prompts, deadline) for i in range(cfg.users)]:
            total.merge(f.result())
    total.seconds = round(time.monotonic() - t0, 1)
    return total


def simulate(
    users: int = typer.Option(4, min=1, max=256, help="Simulated users, chatting concurrently."),
    minutes: float = typer.Option(0.0, min=0.0, help="Stop after this long (0: after --turns questions each)."),
    turns: int = typer.Option(3, min=0, help="Questions per user (0: until --minutes is up)."),
    max_tokens: int = typer.Option(48, min=1, max=4096, help="Answer length cap (keep it small on CPU)."),
    consent_rate: float = typer.Option(0.9, min=0.0, max=1.0, help="Share of users who allow their data to be used."),
    compare_rate: float = typer.Option(0.3, min=0.0, max=1.0, help="Share of questions answered twice and compared."),
    regenerate_rate: float = typer.Option(0.3, min=0.0, max=1.0, help="Share of disliked answers regenerated."),
    withdraw_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of consenting users who later say no."),
    delete_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of users who ask for deletion, then leave."),
    prompts: str = typer.Option("train", help="Prompt split: train, heldout (1 in 4 of each kind) or all."),
    url: str = typer.Option("", help="Base URL of the app; default from settings (127.0.0.1:7860)."),
    api_key: str = typer.Option("", envvar="FLYWHEEL_API_KEY", help="API key, when the app requires one."),
    seed: int = typer.Option(0, help="Changes who the users are (and so their tastes) and what they ask."),
    questions_per_visit: int = typer.Option(
        0, min=0, help="A user comes back under a new user id every this many questions (0: one id each)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Simulated users with hidden tastes chat with the running app through its API and rate the answers."""
    if prompts not in ("train", "heldout", "all"):
        typer.echo(f"simulate: --prompts must be train, heldout or all, not {prompts!r}", err=True)
        raise typer.Exit(2)
    if not turns and not minutes:
        typer.echo("simulate: give --turns or --minutes (or both), else it never ends", err=True)
        raise typer.Exit(2)
    s = get_settings()
    base = url or f"http://{s.app_host}:{s.app_port}"
    try:
        httpx.get(f"{base}/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        typer.echo(f"simulate: the app at {base} is not answering ({e}); start it with `make run`", err=True)
        raise typer.Exit(1) from None
    cfg = SimConfig(
        users=users,
        turns=turns,
        minutes=minutes,
        max_tokens=max_tokens,
        consent_rate=consent_rate,
        compare_rate=compare_rate,
        regenerate_rate=regenerate_rate,
        withdraw_rate=withdraw_rate,
        delete_rate=delete_rate,
        prompts=prompts,
        seed=seed,
        api_key=api_key,
        questions_per_visit=questions_per_visit,
    )  # type: ignore[arg-type]
    if not as_json:
        typer.echo(
            f"simulate: {users} users against {base} "
            f"({f'{minutes} min' if minutes else f'{turns} questions each'}) ...",
            err=True,
        )
    stats = run_simulation(base, cfg)
    if as_json:
        print(json.dumps(stats.as_dict()))
    else:
        typer.echo(
            f"simulate: {stats.users} users {stats.tastes}, {stats.turns} answers, {stats.thumbs} thumbs, "
            f"{stats.comparisons} comparisons, {stats.regenerations} regenerations, "
            f"{stats.consent_withdrawn} withdrew consent, {stats.deletions} asked for deletion, "
            f"{stats.errors} errors, {stats.busy_retries} busy retries in {stats.seconds}s"
        )
        for name, v in sorted(stats.per_version.items()):
            rate = f"{v.up / v.thumbs:.0%}" if v.thumbs else "-"
            acc, mu = v.accuracy(), v.mean_utility()
            typer.echo(
                f"  {name}: {v.answers} answers, right {v.correct}/{v.checked} "
                f"({'-' if acc is None else f'{acc:.0%}'}), mean hidden utility "
                f"{'-' if mu is None else f'{mu:+.2f}'}, thumbs up {v.up}/{v.thumbs} ({rate}), "
                f"side-by-side wins {v.wins}/{v.side_by_side}"
            )
        typer.echo("`flywheel status` shows them landing in the warehouse.")
    if stats.errors:
        raise typer.Exit(1)
