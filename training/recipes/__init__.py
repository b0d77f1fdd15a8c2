"""One runnable script per training method: ``python -m training.recipes.<method> --snapshot ... --parent ...``."""

from __future__ import annotations


def _sft():
    from trl import SFTConfig

    return SFTConfig


def _dpo():
    from trl import DPOConfig

    return DPOConfig


def _kto():
    from trl import KTOConfig

    return KTOConfig


def _reward():
    from trl import RewardConfig

    return RewardConfig


def _rlhf():
    from trl import RLOOConfig

    return RLOOConfig


# The TRL config dataclass of each method (lazily imported: TRL is heavy); pretrain trains with SFTTrainer.
TRL_CONFIGS = {"pretrain": _sft, "sft": _sft, "dpo": _dpo, "kto": _kto, "reward": _reward, "rlhf": _rlhf}
