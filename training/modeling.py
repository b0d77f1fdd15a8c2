"""Loading models for training and evaluation: one place for dtype, padding and the chat template.

Weights load in fp32 (master weights); mixed precision, where the hardware has it, is the trainer's autocast
(``training.config.resolve_precision``). The default tokenizer pads on the right for training; generation for
evaluation and online RL pads on the left (``left_padded``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(path: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def load_reward_model(path: str | Path, tokenizer=None):
    """A sequence classifier with one output (a scalar reward); from a chat model its head starts fresh."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    tok = tokenizer or load_tokenizer(path)
    model.config.pad_token_id = tok.pad_token_id
    return model


@contextmanager
def left_padded(tokenizer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side


def params_fingerprint(model) -> torch.Tensor:
    """A cheap vector summary of all parameters (tests assert training changed it)."""
    return torch.stack([p.detach().float().sum() for p in model.parameters()])


def lora_config(lora: dict | None, task_type: str = "CAUSAL_LM"):
    """``peft.LoraConfig`` from the config's ``lora`` section (None: full fine-tuning)."""
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, **lora)


def merged(model):
    """LoRA adapters are merged before saving, so every version is a plain checkpoint the app can load."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
