"""The chat product as a person uses it, in real Chromium at 1280x900 and 390x844, against one real app server
(real model, real Kafka) for the whole module: stop, continue, regenerate-and-keep, thumbs that stay on the
right answer after retry / new chat / reload, rename and delete, phone layout, privacy and delete-all, the
arena on the current chat, inert rendering of hostile answers, shortcuts, themes, the API link."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from app.router import ReleasePlan, publish_plan
from app.sessions import COOKIE_NAME
from app.ui.render import ALLOWED_TAGS
from feedback.events import ChatTurn, Feedback
from feedback.settings import Settings
from feedback.topics import ensure_topics
from tests.app.conftest import MODEL, read_events, start_app

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
ANSWER_S = 120  # one answer on a loaded 2-core machine
LONG = "Write a long story about a dragon who learns to paint."
THUMBS_JS = """() => Array.from(document.querySelectorAll('#chatbot .message-buttons-left')).map(d =>
  Array.from(d.querySelectorAll('button')).map(b => b.getAttribute('aria-label'))
    .filter(l => /^(Dis)?[Ll]iked?$/.test(l)).join(','))"""


@pytest.fixture(scope="module")
def ui(kafka_broker: Settings, tmp_path_factory, model_backend):
    """One app for the module: the real model under two release names, half the users each."""
    tag = uuid.uuid4().hex[:10]
    home = tmp_path_factory.mktemp("ui") / "home"
    home.mkdir()
    s = Settings(
        home=home,
        kafka_bootstrap=kafka_broker.kafka_bootstrap,
        kafka_controller_port=kafka_broker.kafka_controller_port,
        topic_prefix=f"t{tag}",
        ingest_group=f"ingest-{tag}",
        base_model=str(MODEL),
    )
    ensure_topics(s)
    (s.models_dir / "canary").mkdir(parents=True)
    (s.models_dir / "canary" / "lineage.json").write_text(
        json.dumps(
            {
                "name": "canary",
                "recipe": "dpo",
                "parent": "base",
                "snapshot_id": "f00d" * 16,
                "created_at": "2026-11-29T12:00:00Z",
                "gate": {"passed": True, "reasons": []},
                "tainted": False,
            }
        )
    )
    plan = ReleasePlan.weighted({"base": 0.5, "canary": 0.5}, stage="canary")
    publish_plan(s, plan)
    # 24 tokens: long enough to click Stop mid-answer; a story hit the limit in 40 of 40 tries at 32 tokens
    app = start_app(s, {"base": model_backend, "canary": model_backend}, max_new_tokens=24)
    _BACKENDS[:] = [model_backend]
    try:
        assert app.service.router.wait_for(plan.plan_id, timeout=15)
        yield s, app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get update && apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


_BACKENDS: list = []  # the module's model, for what a timed-out wait reports


def _why(page, waited_for: str) -> str:
    """What a timed-out wait saw: the model's requests in flight and the page's text (a CI run timed out twice in a
    row here, a second answer and then a fresh page, and said nothing more)."""
    inflight = [getattr(b, "_inflight", None) for b in _BACKENDS]
    try:
        text = page.evaluate("document.body ? document.body.innerText : ''")[-600:]
    except Exception as e:  # noqa: BLE001 - the report must not hide the timeout
        text = f"(page unreadable: {e})"
    return f"timed out waiting for {waited_for}; model requests in flight {inflight}; page text ends: {text!r}"


def _wait(page, waited_for: str, fn) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        fn()
    except PlaywrightTimeout:
        pytest.fail(_why(page, waited_for))


def open_page(browser, url: str, viewport: dict, requests: list[str] | None = None):
    """A new person (fresh context, so a fresh cookie) on the chat page."""
    ctx = browser.new_context(viewport=viewport, is_mobile=viewport is PHONE, has_touch=viewport is PHONE)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    page = ctx.new_page()
    if requests is not None:
        page.on("request", lambda r: requests.append(r.url))
    page.goto(url + "/")
    _wait(page, "the chat box", lambda: page.wait_for_selector("#msg textarea", timeout=60_000))
    return page


def open_sidebar(page) -> None:
    """Wide screens open it by themselves; phones by the toggle. Either way, wait until it is on screen."""
    if page.viewport_size["width"] < 900:
        page.click(".sidebar .toggle-button")
    page.wait_for_function("document.querySelector('#new-chat').getBoundingClientRect().left >= 0")


def send(page, text: str) -> None:
    """Type and press Enter, then wait until the message is in the chat (a send the page dropped fails here)."""
    sent = "document.querySelectorAll('#chatbot [data-testid=user]').length"
    before = page.evaluate(sent)
    page.fill("#msg textarea", text)
    page.keyboard.press("Enter")
    _wait(page, "the message in the chat", lambda: page.wait_for_function(f"{sent} > {before}", timeout=60_000))


def wait_answers(page, n: int) -> None:
    """Until ``n`` answers are finished (a finished answer has its version footer)."""
    js = f"document.querySelectorAll('#chatbot .fw-version').length === {n}"
    _wait(page, f"{n} finished answers", lambda: page.wait_for_function(js, timeout=ANSWER_S * 1000))


def wait_streaming(page) -> None:
    page.wait_for_function(
        "(() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
        " return b.length && b[b.length - 1].innerText.trim().length > 0 })()",
        timeout=ANSWER_S * 1000,
    )


RAW_MARKUP_JS = """(allowed) => Array.from(document.querySelectorAll('#chatbot [data-testid=bot]')).flatMap(b => {
  const bad = Array.from(b.querySelectorAll('.fw-md *')).map(e => e.tagName.toLowerCase())
    .filter(t => !allowed.includes(t)).map(t => 'element <' + t + '>');
  const text = b.innerText;
  return bad.concat(['<sub', '<span', '<div', 'class=', 'fw-version'].filter(m => text.includes(m)));
})"""


def assert_no_raw_markup(page) -> None:
    """Every answer on screen: only allowlisted elements, and none of our own markup showing as text."""
    assert page.evaluate(RAW_MARKUP_JS, sorted(ALLOWED_TAGS)) == []


def answers(page) -> list[str]:
    return [b.inner_text() for b in page.query_selector_all("#chatbot [data-testid='bot'] .fw-md")]


def thumbs(page) -> list[str]:
    return page.evaluate(THUMBS_JS)


def status(page, text: str, where: str = "#status") -> None:
    page.wait_for_function(f"document.querySelector('{where}').innerText.includes({json.dumps(text)})", timeout=30_000)


def test_stop_continue_regenerate_keep_and_thumbs_after_new_chat_and_reload(ui, browser):
    _, app = ui
    page = open_page(browser, app.url, DESKTOP)

    # Stop: Send is disabled and Stop shown while the answer streams; Stop ends it, marked, buttons back.
    send(page, LONG)
    wait_streaming(page)
    assert page.is_disabled("#send") and page.is_visible("#stop")
    page.click("#stop")
    wait_answers(page, 1)
    assert "Stopped." in page.inner_text("#chatbot [data-testid='bot'] .fw-meta")
    page.wait_for_selector("#stop", state="hidden")
    assert page.is_enabled("#send")

    # Cut at the length limit: a notice and a Continue action that goes on in the same chat.
    send(page, "Tell me a long story about a cat who sails around the world.")
    wait_answers(page, 2)
    assert "Cut off at the length limit." in page.query_selector_all("#chatbot .fw-meta")[-1].inner_text()
    page.click("#continue")
    wait_answers(page, 3)
    assert page.query_selector_all("#chatbot [data-testid='user']")[-1].inner_text().strip() == "Continue."

    # Rate, regenerate: the new answer shows no thumb; keep the previous one and its thumb comes back.
    page.query_selector_all("#chatbot button[aria-label='Dislike']")[-1].click()
    page.wait_for_selector("#reason-row", state="visible")
    page.wait_for_function(f"({THUMBS_JS})().slice(-1)[0] === 'Disliked,Like'")
    disliked = answers(page)[-1]
    page.query_selector_all("#chatbot button[aria-label='Retry']")[-1].click()
    page.wait_for_selector("#reason-row", state="hidden")
    page.wait_for_selector("#keep-row", state="visible", timeout=ANSWER_S * 1000)
    assert thumbs(page) == ["Dislike,Like"] * 3
    page.click("#keep-previous")
    status(page, "Kept the previous answer")
    assert answers(page)[-1] == disliked and thumbs(page)[-1] == "Disliked,Like"
    assert_no_raw_markup(page)
    assert not page.is_visible("#keep-row")

    # New chat: nothing carried over, no thumb on the next answer.
    page.click("#new-chat")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length === 0")
    send(page, "Name a color.")
    wait_answers(page, 1)
    assert thumbs(page) == ["Dislike,Like"]

    # Reload, open the first chat from the history: the thumb is where it was given.
    page.reload()
    page.wait_for_selector("#msg textarea")
    open_sidebar(page)
    page.get_by_role("radio", name=LONG[:40], exact=False).first.check()
    wait_answers(page, 3)
    assert thumbs(page) == ["Dislike,Like", "Dislike,Like", "Disliked,Like"]
    assert "Stopped." in page.query_selector_all("#chatbot .fw-meta")[0].inner_text()
    assert_no_raw_markup(page)

    # Rename (long titles are cut with an ellipsis, not overflowing), then delete.
    title = "A very long title for the dragon story " * 2
    page.click("#rename")
    page.fill("#rename-box textarea, #rename-box input", title)
    page.click("#rename-save")
    status(page, "Renamed")
    label = page.locator("#history label", has_text="A very long title").first
    span = label.locator("span").last
    assert span.evaluate("e => getComputedStyle(e).textOverflow") == "ellipsis"
    assert span.evaluate("e => e.scrollWidth > e.clientWidth")
    assert label.bounding_box()["x"] + label.bounding_box()["width"] <= 330  # inside the 320 px sidebar
    page.click("#delete")
    page.click("#delete-yes")
    status(page, "Conversation deleted")
    assert "A very long title" not in page.inner_text("#history")
    assert page.query_selector_all("#chatbot [data-testid='bot']") == []


def test_arena_answers_the_current_chat_anonymous_until_the_vote(ui, browser):
    settings, app = ui
    page = open_page(browser, app.url, DESKTOP)
    send(page, "My name is Ada. Say hi to me.")
    wait_answers(page, 1)
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_function("document.querySelector('#cmp-context').innerText.includes('2 earlier messages')")
    page.fill("#cmp-prompt textarea", "What is my name?")
    page.click("#cmp-go")
    page.wait_for_function("!document.querySelector('#vote-b').disabled", timeout=2 * ANSWER_S * 1000)
    panes = page.inner_text("#cmp-panes") + page.inner_text("#cmp-status")
    assert "Model A" in panes and "Model B" in panes
    assert "canary" not in panes and "base" not in panes  # anonymous until the vote
    b_text = page.inner_text("#cmp-b").strip()

    page.click("#vote-b")
    status(page, "Vote recorded", "#cmp-status")
    a_label, b_label = page.inner_text("#cmp-a-label"), page.inner_text("#cmp-b-label")
    assert "✓ your pick" in b_label and "your pick" not in a_label
    revealed = {a_label.split("·")[1].split()[0], b_label.split("·")[1].split()[0]}
    assert revealed == {"base", "canary"}
    assert all(page.is_disabled(s) for s in ("#vote-a", "#vote-tie", "#vote-b"))  # one vote per pair

    # The vote is one pairwise rating of the two compare turns, which saw the chat so far.
    turns = read_events(
        settings,
        settings.topic_turns,
        lambda evs: sum(isinstance(e, ChatTurn) and e.origin == "compare" for e in evs) >= 2,
    )
    compare = {t.turn_id: t for t in turns if isinstance(t, ChatTurn) and t.origin == "compare"}
    assert len(compare) == 2
    for t in compare.values():
        assert [m.content for m in t.messages][::2] == ["My name is Ada. Say hi to me.", "What is my name?"]

    def votes(evs: list) -> list:
        return [e for e in evs if isinstance(e, Feedback) and e.kind == "pairwise" and e.turn_id in compare]

    pair = votes(read_events(settings, settings.topic_feedback, lambda evs: bool(votes(evs))))
    assert len(pair) == 1 and pair[0].value == "b" and {pair[0].turn_id, pair[0].other_turn_id} == set(compare)
    assert {pair[0].model_version, pair[0].other_model_version} == {"base", "canary"}

    # The preferred answer continues the chat.
    page.get_by_role("tab", name="Chat").click()
    wait_answers(page, 2)
    assert answers(page)[-1].strip() == b_text
    assert_no_raw_markup(page)


def test_hostile_stored_answer_is_inert_and_shortcuts_themes_model_card_api_link(ui, browser):
    _, app = ui
    seen: list[str] = []
    page = open_page(browser, app.url, DESKTOP, requests=seen)
    token = next(c["value"] for c in page.context.cookies() if c["name"] == COOKIE_NAME)
    uid = app.service.sessions.unsign(token)
    leak = f"{app.url}/leak"
    hostile = (
        f"Look: <img src='{leak}?q=1'> ![chart]({leak}?q=2) <b>bold?</b> "
        f"[site](javascript:alert(1))\n\n```html\n<img src='{leak}?q=3'>"
    )
    app.service.sessions.save_conversation(
        uid,
        "c-hostile",
        [
            {"role": "user", "content": "<script>alert(1)</script> hi"},
            {
                "role": "assistant",
                "content": hostile,
                "turn_id": "t-x",
                "model_version": "base",
                "done": True,
                "finish": "length",
                "rating": None,
            },
        ],
    )
    page.reload()
    page.wait_for_selector("#msg textarea")
    open_sidebar(page)
    page.get_by_role("radio", name="<script>", exact=False).first.check()
    wait_answers(page, 1)
    page.wait_for_timeout(500)
    bubble = page.locator("#chatbot [data-testid='bot']")
    assert page.locator("#chatbot img, #chatbot script, #chatbot b, #chatbot iframe").count() == 0
    assert "<img src=" in bubble.inner_text() and "<b>bold?</b>" in bubble.inner_text()  # shown as text
    assert page.locator("#chatbot pre .fw-version").count() == 0  # the footer is outside the open code block
    assert page.locator("#chatbot a[href^='javascript']").count() == 0
    assert "<script>alert(1)</script> hi" in page.inner_text("#chatbot [data-testid='user']")
    assert not [u for u in seen if "/leak" in u]
    assert_no_raw_markup(page)

    # Editing a message starts from the person's own text, not its escaped form.
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    box = page.locator("#chatbot textarea").first
    page.wait_for_function("document.querySelector('#chatbot textarea')?.dataset.fwUnescaped === '1'")
    assert box.input_value() == "<script>alert(1)</script> hi"
    page.locator("#chatbot button[aria-label='Cancel']").first.click()

    # Copy gives the text a person sees, not the HTML behind it.
    page.locator("#chatbot button[aria-label='Copy message']").last.click()
    page.wait_for_timeout(300)
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("Look: <img src=") and "fw-md" not in copied and "<p>" not in copied

    # Ctrl+Shift+C copies the last answer the same way; Ctrl+Shift+S hides and shows the sidebar.
    page.evaluate("navigator.clipboard.writeText('')")
    page.click("#model-line")
    page.keyboard.press("Control+Shift+C")
    page.wait_for_function("navigator.clipboard.readText().then(t => t.startsWith('Look: <img src='))")
    page.keyboard.press("Control+Shift+S")
    page.wait_for_function("document.querySelector('#new-chat').getBoundingClientRect().right <= 0")
    page.keyboard.press("Control+Shift+S")
    page.wait_for_function("document.querySelector('#new-chat').getBoundingClientRect().left >= 0")

    # Themes: Ctrl+Shift+L switches, and the choice survives a reload.
    dark = page.evaluate("document.body.classList.contains('dark')")
    page.keyboard.press("Control+Shift+L")
    assert page.evaluate("document.body.classList.contains('dark')") is not dark
    page.reload()
    page.wait_for_selector("#msg textarea")
    page.wait_for_function(f"document.body.classList.contains('dark') === {str(not dark).lower()}")

    # Shortcuts: '/' focuses the box, Esc stops an answer, Ctrl+Shift+O starts a new chat.
    page.click("#model-line")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement === document.querySelector('#msg textarea')")
    send(page, LONG)
    wait_streaming(page)
    page.keyboard.press("Escape")
    wait_answers(page, 1)
    assert "Stopped." in page.inner_text("#chatbot .fw-meta")
    page.keyboard.press("Control+Shift+O")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=bot]').length === 0")

    # The model and its card; "Use via API" goes to the OpenAI-compatible API's own docs.
    line = page.inner_text("#model-line")
    assert "SmolLM2-135M-Instruct" in line and "version" in line
    page.click("#model-card button, #model-card .label-wrap")
    card = page.inner_text("#model-card-text")
    assert "Base model: SmolLM2-135M-Instruct" in card
    assert ("Trained with: dpo, starting from base" in card) == ("canary" in line)
    assert page.get_attribute("#api-link", "href") == "/v1/docs"
    assert page.locator("footer a[href*='view=api']").count() == 0
    spec = page.request.get(app.url + "/v1/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/models" in spec["paths"]
    docs, docs_seen = page.context.new_page(), []
    docs.on("request", lambda r: docs_seen.append(r.url))
    docs.goto(app.url + "/v1/docs")
    docs.wait_for_selector(".opblock-summary-path", timeout=30_000)  # Swagger UI rendered, offline
    assert "/v1/chat/completions" in docs.locator(".opblock-summary-path").all_inner_texts()
    assert docs_seen and not [u for u in docs_seen if not u.startswith(app.url)]  # no CDN


def test_phone_layout_privacy_and_delete_all(ui, browser):
    """Last in the module: deleting a user shreds their events, which the other tests read back from Kafka."""
    _, app = ui
    page = open_page(browser, app.url, PHONE)
    page.wait_for_timeout(500)  # the sidebar script has run

    # First load on a phone: the chat and its input box, not the sidebar.
    def box_on_screen(sel: str) -> bool:
        r = page.locator(sel).bounding_box()
        return (
            r is not None
            and r["y"] >= 0
            and r["y"] + r["height"] <= PHONE["height"]
            and r["x"] >= 0
            and r["x"] + r["width"] <= PHONE["width"]
        )

    assert box_on_screen("#msg textarea") and box_on_screen("#send")
    assert page.locator("#new-chat").bounding_box()["x"] < 0  # the sidebar is closed
    send(page, "Say hello in French.")
    wait_answers(page, 1)
    assert box_on_screen("#msg textarea")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing wider than the screen

    # Honest storage text and a privacy panel that says what, why, and how to take it back.
    open_sidebar(page)
    storage = page.inner_text("#storage")
    assert "stored on this Flywheel server" in storage and "kept in this browser" not in page.inner_text("body")
    page.click("#privacy button, #privacy .label-wrap")
    text = page.inner_text("#privacy-text")
    for needle in ("What is collected", "Where it goes", "What for", "How to take it back", "Delete all my data"):
        assert needle in text
    page.click("#consent input[type=checkbox]")
    status(page, "Thank you")

    # Delete all my data: confirmed, then the history is empty and the person is told.
    assert "Say hello in French" in page.inner_text("#history")
    page.click("#delete-all")
    page.click("#delete-all-yes")
    status(page, "All your data here is deleted")
    assert "Say hello in French" not in page.inner_text("#history")
    assert not page.is_checked("#consent input[type=checkbox]")

    # On a phone, starting a new chat closes the sidebar that covered it.
    page.click("#new-chat")
    page.wait_for_function("document.querySelector('#new-chat').getBoundingClientRect().right <= 0")
    assert box_on_screen("#msg textarea")
