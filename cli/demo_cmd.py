"""``flywheel demo``'s command line: options checked before anything starts (a typo in ``--set`` or ``--gate``
is one sentence and exit 2), then ``cli.demo.run_demo`` and its summary (``cli.demo_report``) or ``--json``."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path
from typing import Any

import typer

from cli.demo import RECIPES, DemoConfig, run_demo
from feedback.settings import get_settings


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------
def _gate_options(pairs: list[str]) -> dict[str, Any]:
    from pydantic import ValidationError

    from training.gate_config import GateConfig

    out: dict[str, Any] = {}
    for p in pairs:
        key, eq, raw = p.partition("=")
        if not eq:
            raise typer.BadParameter(f"--gate {p!r}: write key=value, e.g. --gate max_refqa_items=40")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    try:
        GateConfig(**out)
    except ValidationError as e:
        err = e.errors()[0]
        raise typer.BadParameter(f"--gate {'.'.join(map(str, err['loc']))}: {err['msg']} (see GateConfig)") from None
    return out


def _check_overrides(recipe: str, overrides: list[str]) -> None:
    from training.config import CONFIG_DIR, load_config

    try:
        load_config(CONFIG_DIR / recipe / "tiny.yaml", overrides, method=recipe)
    except ValueError as e:
        raise typer.BadParameter(f"--set: {e}") from None


SET_OPTION = typer.Option(
    None, "--set", help="Recipe override key=value (repeatable; replaces the recipe's row of training.defaults)."
)
JUDGE_SET_OPTION = typer.Option(None, "--judge-set", help="Override for the judge/RM's training (repeatable).")
GATE_OPTION = typer.Option(None, "--gate", help="Gate setting key=value (training GateConfig; repeatable).")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def demo(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (progress still goes to stderr)."),
    train_users: int = typer.Option(12, min=1, max=64, help="Simulated users whose ratings train the model."),
    train_minutes: float = typer.Option(10.0, min=0.1, help="At most this long; they stop when the trigger fires."),
    trigger_ratings: int = typer.Option(360, min=1, help="The stack's volume trigger: curate + train at N ratings."),
    check_interval: int = typer.Option(30, min=5, help="How often the stack's volume trigger looks (seconds)."),
    eval_users: int = typer.Option(10, min=1, max=64, help="Held-out simulated users during the canary."),
    eval_minutes: float = typer.Option(5.0, min=0.1, help="The canary's timeout (the autopilot then rolls back)."),
    max_tokens: int = typer.Option(40, min=8, max=512, help="Answer length cap."),
    recipe: str = typer.Option("sft", help="Training recipe the stack uses: sft, dpo, kto, rlhf."),
    overrides: list[str] | None = SET_OPTION,
    judge_set: list[str] | None = JUDGE_SET_OPTION,
    gate: list[str] | None = GATE_OPTION,
    canary_share: float = typer.Option(0.5, min=0.01, max=0.99, help="Candidate's share of users at canary."),
    min_thumbs: int = typer.Option(20, min=1, help="Ratings per version before the controller may promote."),
    release_margin: float = typer.Option(
        0.05, min=0.0, max=0.99, help="Promote when the candidate's thumbs-up is not worse by this much."
    ),
    eval_fraction: float = typer.Option(0.25, min=0.05, max=0.9, help="Share of conversations curation holds out."),
    timeout_minutes: float = typer.Option(45.0, min=1.0, help="Stop the whole demo after this long."),
    home: str = typer.Option("", help="Where the demo's world lives (default: a new temporary directory)."),
    seed: int = typer.Option(1, help="Who the simulated users are."),
) -> None:
    """The product at a faster clock: the stack triggers, curates, trains, gates and releases by itself."""
    if recipe not in RECIPES:
        typer.echo(f"demo: --recipe must be one of {', '.join(RECIPES)}, not {recipe!r}", err=True)
        raise typer.Exit(2)
    try:
        _check_overrides(recipe, list(overrides or []))
        gate_cfg = _gate_options(list(gate or []))
    except typer.BadParameter as e:
        typer.echo(f"demo: {e}", err=True)
        raise typer.Exit(2) from None
    cfg = DemoConfig(
        train_users=train_users,
        train_minutes=train_minutes,
        trigger_ratings=trigger_ratings,
        check_interval_s=check_interval,
        eval_users=eval_users,
        eval_minutes=eval_minutes,
        max_tokens=max_tokens,
        recipe=recipe,
        overrides=tuple(overrides or ()),
        judge_overrides=tuple(judge_set or ()),
        gate=gate_cfg,
        canary_share=canary_share,
        min_thumbs=min_thumbs,
        release_margin=release_margin,
        eval_fraction=eval_fraction,
        seed=seed,
        timeout_minutes=timeout_minutes,
    )
    where = Path(home) if home else Path(tempfile.mkdtemp(prefix="flywheel-demo-"))
    where.mkdir(parents=True, exist_ok=True)
    base = get_settings().base_model_path
    if not (base / "config.json").exists():
        typer.echo(f"demo: the base model is missing at {base}: run `make setup`", err=True)
        raise typer.Exit(1)
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated demo still stops its stack
    try:
        out = run_demo(cfg, where, quiet=False)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one sentence and where to look, not a stack trace
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        msg = f"demo failed: {why} (its world, logs included, is in {where}; the stack was stopped)"
        if as_json:
            print(json.dumps({"ok": False, "error": msg}))
        else:
            typer.echo(msg, err=True)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(out, indent=2, default=str))
    else:
        from cli.demo_report import summary_lines

        for line in summary_lines(out):
            typer.echo(line)
        if out["error"]:
            typer.echo(f"demo failed: {out['error']} (its world, logs included, is in {where})", err=True)
    if out["error"] or out["stop"]["leftovers"]:
        raise typer.Exit(1)
