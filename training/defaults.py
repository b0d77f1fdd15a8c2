"""The one table of training defaults for the loop: which recipe the product trains and the overrides of its
config that pass the gate.

The train flow (``pipelines.training.TrainConfig``), the volume trigger (which queues the train flow) and
``flywheel demo`` all read it, so the running product trains what the demo measured instead of a flow default
the gate refuses. It lives in ``training/`` because it is a fact about the recipes and this model (which
overrides of ``training/configs/<recipe>/tiny.yaml`` gave a gate-passing candidate), and because ``pipelines/``
and ``cli/`` both sit above it.

Every entry is overridable per run without editing this file: ``FLYWHEEL_TRAIN_RECIPE`` picks another recipe
(its row here, or none), ``FLYWHEEL_TRAIN_OVERRIDES='["train.max_steps=4"]'`` replaces the row.

Measured (``benchmarks/results/demo.json``, 2 CPU cores): sft, 16 steps at 1e-4 on the liked answers plus 16
safety rows, a quarter of them refusals (``training/safety.py``), passed the gate (win rate 0.92). Half refusals
made the 135M model refuse harmless look-alikes; without any it lost its few red-team refusals; DPO at 16 steps
(2e-5) and SFT without the safety mix stopped at the gate. When a gate change (or a new model) moves that,
re-measure with ``flywheel demo --json`` and change the row here: nothing else needs to change.
"""

from __future__ import annotations

DEFAULT_RECIPE = "sft"

RECIPE_DEFAULTS: dict[str, tuple[str, ...]] = {
    "sft": ("data.safety_mix=16", "data.safety_refusal_share=0.25", "train.max_steps=16", "train.learning_rate=1e-4"),
}


def recipe_overrides(recipe: str) -> tuple[str, ...]:
    """The measured overrides for ``recipe`` (none for a recipe without a row: its config's own values)."""
    return RECIPE_DEFAULTS.get(recipe, ())
