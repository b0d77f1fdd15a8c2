"""One real training step in every precision, on whatever CPU (or GPU) this machine has.

The machine kind comes with an AVX2-only AMD EPYC, an AMD EPYC with AVX512-BF16 or an Intel Xeon with
AVX512-BF16: the suite used to run only on the first, and on the others ``precision: auto`` picked bf16, which
transformers refuses on a CPU without ``use_cpu`` ("Your setup doesn't support bf16/gpu"), so nothing trained.
Each precision either trains one step (finite loss, weights changed) or, where the hardware cannot do it, is
refused by ``resolve_precision`` with one sentence; the test prints which, so the log says what was covered.
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import REPO, need_model
from training.config import ConfigError, cpu_bf16_supported, load_config, resolve_precision, trl_args

BASE = REPO / ".flywheel" / "models" / "base"
pytestmark = pytest.mark.slow  # trains the real model once per precision: not for `make test-fast`


def _supported(precision: str) -> tuple[bool, str]:
    import torch

    if precision == "fp32":
        return True, "every machine"
    if torch.cuda.is_available():
        ok = precision == "fp16" or torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name(0)}"
    if precision == "bf16":
        return cpu_bf16_supported(), f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    return False, "no CUDA device"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_one_step_in_every_precision_this_machine_supports(precision, tmp_path, capsys):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from training.modeling import load_policy, load_tokenizer, params_fingerprint

    supported, why = _supported(precision)
    if not supported:
        with pytest.raises(ConfigError, match=precision):
            resolve_precision(precision)
        with capsys.disabled():
            print(f"\n[precision] {precision}: not supported here ({why}); refused with a clear sentence, not trained")
        return
    assert resolve_precision(precision) == precision
    need_model(BASE)
    tok = load_tokenizer(BASE)
    model = load_policy(BASE)
    before = params_fingerprint(model).clone()
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (("What is two plus two?", "Four."), ("Name a colour.", "Blue."))
    ]
    cfg = load_config(
        REPO / "training" / "configs" / "sft" / "tiny.yaml",
        ["train.max_steps=1", "train.per_device_train_batch_size=2", "train.learning_rate=1e-3"],
    )
    args = trl_args(SFTConfig, cfg, tmp_path / "out", precision)
    assert args.bf16 == (precision == "bf16") and args.fp16 == (precision == "fp16")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    out = trainer.train()
    assert math.isfinite(out.training_loss), f"{precision}: loss {out.training_loss}"
    assert not params_fingerprint(model).equal(before), f"{precision}: the step changed no weight"
    with capsys.disabled():
        print(f"\n[precision] {precision}: one step trained ({why}), loss {out.training_loss:.3f}")
