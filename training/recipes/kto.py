"""KTO: unpaired thumbs (``prompt``/``completion``/``label``): liked answers desirable, disliked undesirable.

Thumbs are far more plentiful than comparisons, so this is the method that uses most of what people give.

    python -m training.recipes.kto --snapshot latest --parent production --config tiny
"""

from __future__ import annotations

import sys

from training.modeling import load_policy, load_tokenizer, lora_config, merged
from training.runner import Job, TrainingError, main


def train(job: Job):
    from trl import KTOConfig, KTOTrainer

    from training.config import trl_args

    data = job.table()
    labels = set(data["label"])
    if labels != {True, False}:
        have = "liked" if labels == {True} else "disliked"
        raise TrainingError(
            f"KTO needs both liked and disliked answers; snapshot has only {have} ones: "
            "collect more ratings or use the sft recipe"
        )
    desirable = sum(data["label"])
    tok = load_tokenizer(job.parent_path)
    # Balance the two sides as the KTO paper recommends (weights keep the effective ratio within [1, 4/3]).
    extra = {}
    if "desirable_weight" not in job.cfg.train and "undesirable_weight" not in job.cfg.train:
        undesirable = len(data) - desirable
        extra = (
            {"desirable_weight": max(1.0, undesirable / max(desirable, 1))}
            if desirable < undesirable
            else {"undesirable_weight": max(1.0, desirable / max(undesirable, 1))}
        )
    args = trl_args(KTOConfig, job.cfg, job.work_dir, job.precision, **extra)
    trainer = KTOTrainer(
        model=load_policy(job.parent_path),
        args=args,
        train_dataset=data,
        eval_dataset=job.eval_table(),
        processing_class=tok,
        peft_config=lora_config(job.cfg.lora),
    )
    job.train(trainer)
    if trainer.eval_dataset is not None:
        job.metrics.update(trainer.evaluate())
    return job.finish(merged(trainer.model), tok)


if __name__ == "__main__":
    sys.exit(main("kto", train))
