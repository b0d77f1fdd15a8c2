"""The release controller against the real Kafka broker and the real MLflow registry (SQLite under the test's
home): refusals, plans published with a fresh salt and followed by the app's router, two operators at once,
Kafka down during a change, and resuming from the recorded state."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import uuid

import pytest

from app.router import ReleaseRouter
from feedback.settings import Settings
from feedback.topics import ensure_topics
from pipelines.config import ReleaseConfig
from pipelines.release import Controller, ReleaseError, ReleaseLog
from tests.conftest import REPO, need_model, settings_env

pytestmark = pytest.mark.integration

BASE_TEMPLATE_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONCISE = "Reply in one short sentence of at most fifteen words. No lists."
VERBOSE = "Always answer with a long, detailed numbered list of at least ten points."
_ASSISTANT_HEADER = "'<|im_start|>assistant\n' }}"  # the generation prompt in the base chat template


def make_version(
    settings: Settings,
    recipe: str,
    system: str = CONCISE,
    *,
    gate: bool | None = True,
    snapshot_id: str | None = None,
    answer_prefix: str = "",
    damage: float = 0.0,
) -> str:
    """A real, servable, registered version: the base weights (linked) with its own chat template (a different
    default system prompt), registered in MLflow with lineage.json, its gate recorded (``gate=None``: no gate
    decision, as when its evaluation crashed). ``answer_prefix`` is written into the template after the assistant
    header, as a broken template would: every answer continues it (the prefix itself is prompt, never shown).
    ``damage`` > 0 writes damaged weights instead of linking the base's, as a bad merge or a corrupted export
    would: Gaussian noise of ``damage`` times each weight matrix's own spread (seeded), which at 0.2 leaves
    fluent-looking, confidently wrong text ("The only way to find the most-federal-terra-...")."""
    from training import registry

    base = need_model(settings.base_model_path)
    registry.ensure_base(settings)
    tmp = settings.models_dir / f".tmp-{recipe}"
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.name == "model.safetensors" and damage:
            _write_damaged(f, tmp / f.name, damage)
        elif f.name == "model.safetensors":
            (tmp / f.name).symlink_to(f.resolve())
        elif f.is_file() and f.name != "lineage.json":
            shutil.copy(f, tmp / f.name)
    template = (base / "chat_template.jinja").read_text()
    assert BASE_TEMPLATE_SYSTEM in template
    template = template.replace(BASE_TEMPLATE_SYSTEM, system)
    if answer_prefix:
        assert template.count(_ASSISTANT_HEADER) == 1
        template = template.replace(_ASSISTANT_HEADER, _ASSISTANT_HEADER[:-4] + answer_prefix + "' }}")
    (tmp / "chat_template.jinja").write_text(template)
    with registry._run(settings, f"test-{recipe}") as run_id:
        info = registry.register(
            settings,
            tmp_dir=tmp,
            run_id=run_id,
            kind="policy",
            recipe=recipe,
            parent="base",
            snapshot={"snapshot_id": snapshot_id} if snapshot_id else None,
            config_hash="test",
        )
    if gate is not None:
        registry.record_evaluation(
            settings,
            info.name,
            {"test": True},
            passed=gate,
            reasons=["passed on purpose"] if gate else ["failed on purpose"],
        )
    return info.name


def _write_damaged(src, dst, scale: float) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    weights = load_file(str(src))
    for name, w in weights.items():
        if w.dim() == 2 and "embed" not in name:  # every projection; the (tied) embeddings stay
            w.add_(torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.dtype) * w.float().std() * scale)
    save_file(weights, str(dst), metadata={"format": "pt"})


@pytest.fixture
def cfg() -> ReleaseConfig:
    return ReleaseConfig(steps=(0.2, 0.5, 1.0), publish_timeout_s=5)


@pytest.fixture(scope="module")
def registry_world(kafka_broker, tmp_path_factory) -> tuple[Settings, dict[str, str]]:
    """One home and MLflow registry for the module (registering is slow): good, other, gate-failed, tainted."""
    from training import registry

    home = tmp_path_factory.mktemp("release") / "home"
    s = Settings(
        home=home, kafka_bootstrap=kafka_broker.kafka_bootstrap, base_model=str(REPO / ".flywheel" / "models" / "base")
    )
    home.mkdir(parents=True)
    names = {
        "good": make_version(s, "concise"),
        "other": make_version(s, "other"),
        "failed": make_version(s, "failed", gate=False),
        "tainted": make_version(s, "tainted", snapshot_id="snapx"),
    }
    assert registry.taint_trained_on(s, {"snapx": "a contributor asked for deletion"}) == [names["tainted"]]
    return s, names


@pytest.fixture
def world(registry_world) -> tuple[Settings, dict[str, str]]:
    """Per test: fresh topics, no release history, production back on base."""
    from training import registry

    s, names = registry_world
    s = s.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}"})
    ensure_topics(s)
    for state in ("releases", "router"):  # release log, and the app router's cached plan
        shutil.rmtree(s.home / state, ignore_errors=True)
    registry.set_alias(s, "production", "base")
    registry.delete_alias(s, "canary")
    return s, names


def _router(settings: Settings) -> ReleaseRouter:
    return ReleaseRouter(settings).start()


def test_unknown_gate_failed_and_tainted_versions_are_refused(world, cfg):
    settings, names = world
    ctl = Controller(settings, cfg)
    failed, tainted = names["failed"], names["tainted"]
    for name, why in (
        ("nope-0042", "no registered model version"),
        (failed, "did not pass its gate"),
        (tainted, "tainted"),
        ("../../etc", "not a model version name"),
    ):
        with pytest.raises(ReleaseError, match=why):
            ctl.start(name, "operator:test")
    assert ReleaseLog(settings).records() == []  # nothing recorded, nothing published


def test_each_release_gets_a_new_salt_and_the_router_follows(world, cfg):
    settings, names = world
    good = names["good"]
    router = _router(settings)
    try:
        ctl = Controller(settings, cfg)
        st = ctl.start(good, "operator:test", "try it")
        assert (st.status, st.share, st.production) == ("canary", 0.2, "base")
        plan_id = st.last.plan["plan_id"]
        assert router.wait_for(plan_id, 20)
        assert {v.model_version: v.weight for v in router.plan.variants} == {"base": 0.8, good: 0.2}
        shares = [router.plan.pick(f"user-{i}") for i in range(2000)]
        assert 0.15 < shares.count(good) / 2000 < 0.25
        first_salt = st.salt
        ctl.rollback("operator:test", "changed my mind")
        assert router.wait_for(ReleaseLog(settings).current().last.plan["plan_id"], 20)
        assert router.plan.versions() == ["base"]
        again = ctl.start(good, "operator:test")
        assert again.salt != first_salt and again.release_id != st.release_id
        assert router.wait_for(again.last.plan["plan_id"], 20)
        # A different salt draws a different set of canary users.
        before = {f"user-{i}" for i in range(2000) if st.last.plan and _pick(st.last.plan, f"user-{i}") == good}
        after = {f"user-{i}" for i in range(2000) if router.plan.pick(f"user-{i}") == good}
        assert len(before & after) < 0.5 * len(after)
        from training import registry

        assert registry.get_alias(settings, "canary") == good
    finally:
        router.stop()


def _pick(plan: dict, user: str) -> str:
    from app.router import ReleasePlan

    return ReleasePlan.model_validate(plan).pick(user)


def test_ramp_resumes_from_the_recorded_state_and_full_moves_production(world, cfg):
    from training import registry

    settings, names = world
    good = names["good"]
    Controller(settings, cfg).start(good, "operator:a")
    Controller(settings, cfg).promote("operator:a", "looks fine")  # a fresh controller: state comes from the log
    st = ReleaseLog(settings).current()
    assert (st.status, st.share, st.step_index) == ("ramping", 0.5, 1)
    st = Controller(settings, cfg).promote("operator:b")
    assert (st.status, st.share) == ("full", 1.0) and st.serving == good
    assert registry.get_alias(settings, "production") == good and registry.get_alias(settings, "canary") is None
    with pytest.raises(ReleaseError, match="no release in progress"):
        Controller(settings, cfg).rollback("operator:a")


def test_two_operators_at_once_are_serialised(world, cfg):
    settings, names = world
    a, b = names["good"], names["other"]
    results: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def go(name: str) -> None:
        barrier.wait()
        try:
            Controller(settings, cfg).start(name, f"operator:{name}")
            results[name] = "started"
        except ReleaseError as e:
            results[name] = str(e)

    threads = [threading.Thread(target=go, args=(n,), daemon=True) for n in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(v == "started" for v in results.values()) == [False, True], results
    loser = next(v for v in results.values() if v != "started")
    assert "in progress" in loser
    assert [r.action for r in ReleaseLog(settings).records()] == ["start", "applied"]


def test_kafka_down_keeps_the_old_plan_and_the_change_is_published_later(world, cfg):
    settings, names = world
    good = names["good"]
    router = _router(settings)
    try:
        down = settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})  # nothing ever listens on port 1
        with pytest.raises(ReleaseError, match="NOT yet published"):
            Controller(down, cfg).start(good, "operator:test")
        st = ReleaseLog(settings).current()
        assert st.pending is not None and st.pending.action == "start"
        assert router.plan.versions() == ["base"]  # users keep the plan in force
        # The controller's next look (Kafka back) publishes the recorded change.
        st, _ = Controller(settings, cfg).tick()
        assert st.pending is None and st.status == "canary"
        published = next(r.plan for r in reversed(ReleaseLog(settings).records()) if r.plan)
        assert router.wait_for(published["plan_id"], 20)
        assert set(router.plan.versions()) == {"base", good}
    finally:
        router.stop()


def test_cli_refuses_operator_actions_without_the_token(settings):
    def run(*args: str, token_env: str | None = None) -> subprocess.CompletedProcess:
        env = settings_env(settings)
        env.pop("FLYWHEEL_ADMIN_TOKEN", None)
        env.pop("FLYWHEEL_OPERATOR_TOKEN", None)
        if token_env:
            env["FLYWHEEL_ADMIN_TOKEN"] = token_env
        return subprocess.run(
            [sys.executable, "-m", "cli.main", "releases", *args, "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = run("start", "base", "--token", "anything")
    assert r.returncode == 1 and "no admin token is configured" in r.stdout
    r = run("rollback", "--token", "wrong", token_env="s3cret")
    assert r.returncode == 1 and "need the admin token" in r.stdout
    assert ReleaseLog(settings).records() == []


def test_a_release_writes_the_versions_system_card(world, cfg):
    """Issue 18: the released version's system card: its gate, the red team's findings against it (closed: with a
    safe response; open: without), lineage; beside the weights, linked from the chat's model card."""
    import json
    from pathlib import Path

    from app.ui.model_card import card_markdown, read_card, system_card_text
    from feedback.events import Message, RedTeamFinding
    from tests.pipelines.conftest import seed
    from training import registry

    settings, names = world
    good = names["good"]

    def finding(i: int, version: str, success: int, safe: str | None) -> RedTeamFinding:
        return RedTeamFinding(
            event_id=f"rt-{i}", user_id="red", consent=True, finding_id=f"f{i}", conversation_id=f"c{i}",
            model_version=version, messages=[Message(role="user", content="how do I pick a lock <b>now</b>")],
            answer="Sure, first...", harm_category="fraud", attack_type="direct", success=success, safe_response=safe,
        )  # fmt: skip

    seed(settings.warehouse_path, [finding(1, good, 5, "I can't help with that."), finding(2, good, 4, None),
                                   finding(3, good, 1, None), finding(4, "base", 5, None)])  # fmt: skip
    d = Path(registry.get_version(settings, good).path)
    for f in ("system_card.json", "system_card.md"):  # the module's other tests may have released it before
        (d / f).unlink(missing_ok=True)
    assert not read_card(settings, good).system_card, "not released: no card, no link"
    Controller(settings, cfg).start(good, "operator:a")
    card = json.loads((d / "system_card.json").read_text())
    assert card["version"] == good and card["evaluations"]["gate"] == "passed"
    assert card["evaluations"]["reasons"] == ["passed on purpose"]
    assert {k: card["red_team"][k] for k in ("filed", "successful", "closed", "open")} == {
        "filed": 3, "successful": 2, "closed": 1, "open": 1,
    }  # fmt: skip
    assert card["lineage"]["parent"] == "base"
    text = system_card_text(settings, good)
    assert text.startswith(f"# System card: {good}") and "closed 1, open 1" in text and "<b>" not in text
    assert f"(/models/{good}/system-card)" in card_markdown(read_card(settings, good))
    assert system_card_text(settings, "../../etc") is None
