"""DPO: direct preference optimisation on the snapshot's pairs (``prompt``/``chosen``/``rejected``).

The reference model is the parent, frozen (TRL makes the copy), so the KL anchor is the version users had.

    python -m training.recipes.dpo --snapshot latest --parent production --config tiny train.beta=0.2
"""

from __future__ import annotations

import sys

from training.modeling import load_policy, load_tokenizer, lora_config, merged
from training.runner import Job, main


def train(job: Job):
    from trl import DPOConfig, DPOTrainer

    from training.config import trl_args

    tok = load_tokenizer(job.parent_path)
    args = trl_args(DPOConfig, job.cfg, job.work_dir, job.precision)
    trainer = DPOTrainer(
        model=load_policy(job.parent_path),
        args=args,
        train_dataset=job.table(),
        eval_dataset=job.eval_table(),
        processing_class=tok,
        peft_config=lora_config(job.cfg.lora),
    )
    job.train(trainer)
    if trainer.eval_dataset is not None:
        job.metrics.update(trainer.evaluate())
    return job.finish(merged(trainer.model), tok)


if __name__ == "__main__":
    sys.exit(main("dpo", train))
