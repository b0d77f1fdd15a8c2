"""EXTENSION POINT: what the volume trigger runs after curating a snapshot.

No training recipe is installed yet, so ``train`` only logs that. When ``training/recipes/`` lands, make this
call the recipe(s) on the snapshot (e.g. ``python -m training.recipes.dpo --snapshot <path>``) and return the
candidate model's path; the flow in ``pipelines.flows`` already passes the snapshot id and path.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

NO_RECIPE = "no training recipe installed"


def train(snapshot_id: str, snapshot_path: Path, logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
    (logger or log).info("%s: snapshot %s (%s) is ready for training", NO_RECIPE, snapshot_id, snapshot_path)
    return None
