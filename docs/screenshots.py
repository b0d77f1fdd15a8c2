"""Make the README's pictures from the running product, so they show what the code does today.

    python -m docs.screenshots            # writes docs/img/chat-desktop.png, chat-dark.png, chat-phone.png, compare.png
    python -m docs.screenshots --serve    # just run the product as the screenshots see it (Ctrl-C stops)

It starts what the product needs, in a private FLYWHEEL_HOME under /tmp: a real Kafka broker, the real default
model served as two release names ("base" and "canary", half the users each, so Compare has two versions),
and the app; then real Chromium chats, rates, and compares at 1280x900 and 390x844. Everything it started is
stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from infra.ports import free_port

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def start_stack(home: Path, max_new_tokens: int):
    """Broker, topics, release plan, app server. Returns (settings, url, stop)."""
    import uvicorn

    from app.backends.embedded import EmbeddedBackend
    from app.router import ReleasePlan, publish_plan
    from app.server import create_app
    from feedback.settings import Settings
    from feedback.topics import ensure_topics
    from infra import kafka_local

    settings = Settings(
        home=home,
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        kafka_heap="512m",
        base_model=str(REPO / ".flywheel" / "models" / "base"),
    )
    print(f"screenshots: starting Kafka on {settings.kafka_bootstrap} ...", flush=True)
    kafka_local.start(settings, quiet=True)
    ensure_topics(settings)
    # "canary" is the same base model under a second release name: its card says so (a copy of base's meta.json).
    (settings.models_dir / "canary").mkdir(parents=True)
    shutil.copy(settings.base_model_path / "meta.json", settings.models_dir / "canary" / "meta.json")
    plan = ReleasePlan.weighted({"base": 0.5, "canary": 0.5}, stage="canary")
    publish_plan(settings, plan)
    backend = EmbeddedBackend(settings.base_model_path, max_concurrency=4, max_queue=4)
    app = create_app(settings, backends={"base": backend, "canary": backend}, max_new_tokens=max_new_tokens)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    app.state.service.router.wait_for(plan.plan_id, timeout=15)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        asyncio.run(backend.aclose())
        kafka_local.stop(settings, kill=True)

    return settings, f"http://127.0.0.1:{port}", stop


def wait_answer(page, count: int, timeout_s: float = 120) -> None:
    """Until ``count`` answers are finished (their version footer is shown)."""
    page.wait_for_function(
        f"document.querySelectorAll('#chatbot .fw-version').length >= {count}", timeout=timeout_s * 1000
    )


def shoot(url: str, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    made = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            ctx = browser.new_context(viewport=DESKTOP)
            page = ctx.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#msg textarea", timeout=60_000)
            page.fill("#msg textarea", "Write a Python function that reverses a string, with a short explanation.")
            page.keyboard.press("Enter")
            wait_answer(page, 1)
            page.click("#chatbot button[aria-label='Like']")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Thanks')")
            page.fill("#msg textarea", "And in one sentence, what is a palindrome?")
            page.keyboard.press("Enter")
            wait_answer(page, 2)
            page.wait_for_timeout(500)
            made.append(out / "chat-desktop.png")
            page.screenshot(path=str(made[-1]))
            page.keyboard.press("Control+Shift+L")  # the dark theme, same page
            page.wait_for_timeout(300)
            made.append(out / "chat-dark.png")
            page.screenshot(path=str(made[-1]))
            page.keyboard.press("Control+Shift+L")

            page.get_by_role("tab", name="Compare").click()
            page.fill("#cmp-prompt textarea", "Give me one tip for writing readable code.")
            page.click("#cmp-go")
            page.wait_for_function("!document.querySelector('#vote-b').disabled", timeout=180_000)
            page.click("#vote-b")
            page.wait_for_function("document.querySelector('#cmp-status').innerText.includes('Vote recorded')")
            page.wait_for_timeout(300)
            made.append(out / "compare.png")
            page.screenshot(path=str(made[-1]))
            ctx.close()

            phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
            page = phone.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#msg textarea", timeout=60_000)
            page.fill("#msg textarea", "Suggest a name for a cat, with a reason.")
            page.keyboard.press("Enter")
            wait_answer(page, 1)
            page.wait_for_timeout(500)
            made.append(out / "chat-phone.png")
            page.screenshot(path=str(made[-1]))
            phone.close()
        finally:
            browser.close()
    return made


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops it as Ctrl-C does: everything started is stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="where the PNG files go (default docs/img)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="answer length in the pictures")
    ap.add_argument("--serve", action="store_true", help="only run the product until Ctrl-C")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if not Path(CHROMIUM).exists():
        print(f"screenshots: {CHROMIUM} is missing: run `make chromium` (apt-get install -y chromium)")
        return 1
    if not (REPO / ".flywheel" / "models" / "base" / "config.json").exists():
        print("screenshots: the default model is missing: run `make setup` first")
        return 1
    home = Path(tempfile.mkdtemp(prefix="flywheel-shots-"))
    stop = None
    try:
        _, url, stop = start_stack(home, args.max_new_tokens)
        if args.serve:
            print(f"screenshots: the product is at {url}/ (Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                return 0
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        made = shoot(url, args.out)
        took = round(time.monotonic() - t0, 1)
        if args.json:
            print(json.dumps({"files": [str(p) for p in made], "seconds": took}))
        else:
            print(f"screenshots: wrote {', '.join(str(p.relative_to(REPO)) for p in made)} in {took} s")
        return 0
    finally:
        if stop is not None:
            stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
