"""``flywheel app``: run the chat product, and look at or set the release plan it follows.

flywheel app serve [--auth alice:secret] [--max-new-tokens 256]   # UI at /, API at /v1, on 127.0.0.1:7860
flywheel app plan [--json]                                         # the plan the app is following
flywheel app publish base=0.9 sft-0003=0.1 --stage canary          # publish a new plan (incumbent first)
"""

from __future__ import annotations

import json
import logging

import typer

from feedback.settings import get_settings

AUTH = typer.Option(None, "--auth", help="user:password, repeatable; turns on Gradio login.")
JSON = typer.Option(False, "--json", help="Print one JSON object.")
WEIGHTS = typer.Argument(..., help="VERSION=WEIGHT ..., incumbent first, candidate last.")

app_cmd = typer.Typer(
    help="The chat product (Gradio UI + OpenAI-compatible API) and its release plan.", no_args_is_help=True
)


def _auth(pairs: list[str] | None) -> list[tuple[str, str]] | None:
    if not pairs:
        return None
    out = []
    for p in pairs:
        user, sep, password = p.partition(":")
        if not sep or not user or not password:
            raise typer.BadParameter(f"--auth takes user:password, got {p!r}")
        out.append((user, password))
    return out


@app_cmd.command("serve")
def serve(
    host: str = typer.Option(None, help="Default: FLYWHEEL_APP_HOST (127.0.0.1)."),
    port: int = typer.Option(None, help="Default: FLYWHEEL_APP_PORT (7860)."),
    auth: list[str] = AUTH,
    max_new_tokens: int = typer.Option(
        None, min=1, max=2048, help="Answer length in the browser UI (default: FLYWHEEL_APP_MAX_NEW_TOKENS, 256)."
    ),
) -> None:
    """Serve the UI and the API on one port until Ctrl-C."""
    from app.keys import ExposureError
    from app.server import configure_logging
    from app.server import serve as run

    s = get_settings()
    update = {k: v for k, v in (("app_host", host), ("app_port", port)) if v is not None}
    configure_logging()
    try:
        run(s.model_copy(update=update) if update else s, auth=_auth(auth), max_new_tokens=max_new_tokens)
    except ExposureError as e:
        typer.echo(f"app: {e}", err=True)
        raise typer.Exit(2) from None


@app_cmd.command("plan")
def plan(as_json: bool = JSON, wait_s: float = typer.Option(5.0, help="How long to read the topic.")) -> None:
    """The release plan on the releases topic (the base model for everyone when none was published)."""
    import time

    from app.router import ReleaseRouter

    logging.getLogger("kafka").setLevel(logging.ERROR)
    router = ReleaseRouter(get_settings()).start()
    deadline = time.monotonic() + wait_s
    while not router.published and time.monotonic() < deadline:
        time.sleep(0.1)
    router.stop()
    p = router.plan
    if as_json:
        print(json.dumps({"published": router.published, **p.model_dump(mode="json")}, indent=2))
        return
    shares = ", ".join(f"{v.model_version} {v.weight:g}" for v in p.variants)
    state = f"plan {p.plan_id} ({p.stage or 'no stage'})" if router.published else "no plan published: default"
    typer.echo(f"{state}: {shares}")


@app_cmd.command("publish")
def publish(
    weights: list[str] = WEIGHTS,
    stage: str = typer.Option("", help="canary, ramp-50, full, rollback ..."),
) -> None:
    """Publish a release plan; every running app follows it within seconds."""
    from app.router import ReleasePlan, publish_plan

    parsed: dict[str, float] = {}
    for w in weights:
        version, sep, share = w.partition("=")
        try:
            parsed[version] = float(share) if sep else 1.0
        except ValueError:
            raise typer.BadParameter(f"expected VERSION=WEIGHT, got {w!r}") from None
    try:
        p = ReleasePlan.weighted(parsed, stage=stage)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    publish_plan(get_settings(), p)
    typer.echo(f"published plan {p.plan_id}: " + ", ".join(f"{k} {v:g}" for k, v in parsed.items()))
