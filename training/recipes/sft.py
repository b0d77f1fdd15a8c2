"""SFT: supervised fine-tuning on the answers people liked (the snapshot's ``sft`` table, TRL ``messages``).

python -m training.recipes.sft --snapshot latest --parent production --config tiny train.max_steps=4
"""

from __future__ import annotations

import sys

from training.modeling import load_policy, load_tokenizer, lora_config, merged
from training.runner import Job, main


def train(job: Job):
    from trl import SFTConfig, SFTTrainer

    from training.config import trl_args

    tok = load_tokenizer(job.parent_path)
    model = load_policy(job.parent_path)
    args = trl_args(SFTConfig, job.cfg, job.work_dir, job.precision)
    trainer = SFTTrainer(
        model=model,
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
    sys.exit(main("sft", train))
