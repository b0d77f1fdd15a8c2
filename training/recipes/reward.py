"""Reward model: a scalar scorer trained on the snapshot's preference pairs (Bradley-Terry, TRL RewardTrainer).

It starts from the parent chat model's body with a fresh one-output head. It is registered like every model
(kind ``reward``: never served to users); ``rlhf`` optimises against it, and evaluation uses a *different* one as
the judge of win rates, so a policy is never graded by the model it was trained to please.

    python -m training.recipes.reward --snapshot latest --parent production --config tiny
"""

from __future__ import annotations

import sys

from training.modeling import load_reward_model, load_tokenizer, lora_config, merged
from training.runner import Job, main


def train(job: Job):
    from trl import RewardConfig, RewardTrainer

    from training.config import trl_args

    tok = load_tokenizer(job.parent_path)
    model = load_reward_model(job.parent_path, tok)
    args = trl_args(RewardConfig, job.cfg, job.work_dir, job.precision)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=job.table(),
        eval_dataset=job.eval_table(),
        processing_class=tok,
        peft_config=lora_config(job.cfg.lora, "SEQ_CLS"),
    )
    job.train(trainer)
    if trainer.eval_dataset is not None:
        job.metrics.update(trainer.evaluate())
    return job.finish(merged(trainer.model), tok, kind="reward")


if __name__ == "__main__":
    sys.exit(main("reward", train))
