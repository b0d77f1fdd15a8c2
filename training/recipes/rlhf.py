"""RLHF: the policy optimised online against a registered reward model, with a KL penalty to its parent.

Why RLOO (TRL's ``RLOOTrainer``) rather than GRPO: both are PPO's clipped policy gradient without a value head
(PPO itself left TRL after 1.12), but RLOO folds the KL to the reference model into the reward, the classic RLHF
objective ``r(x, y) - beta * KL(pi || pi_parent)``, while GRPO's default is no KL term at all; and RLOO's
leave-one-out baseline is unbiased with as few as two samples per prompt, which is what a 2-core CPU can afford.

    python -m training.recipes.rlhf --snapshot latest --parent production --config tiny model.reward_version=reward-0004
"""

from __future__ import annotations

import sys

from training import registry
from training.modeling import load_policy, load_reward_model, load_tokenizer, lora_config, merged
from training.runner import Job, TrainingError, main


def reward_version(job: Job) -> registry.VersionInfo:
    want = job.cfg.model.reward_version
    if want:
        try:
            rm = registry.get_version(job.settings, want)
        except KeyError as e:
            raise TrainingError(str(e.args[0])) from None
        if rm.kind != "reward":
            raise TrainingError(f"model.reward_version={want} is a {rm.kind} model, not a reward model")
    else:
        rms = [v for v in registry.list_versions(job.settings) if v.kind == "reward" and not v.tainted]
        if not rms:
            raise TrainingError("no reward model is registered: run `python -m training.recipes.reward` first")
        rm = rms[-1]
    if rm.tainted:
        raise TrainingError(f"reward model {rm.name} is tainted ({rm.tainted_reason}): train a fresh one")
    return rm


def train(job: Job):
    from trl import RLOOConfig, RLOOTrainer

    from training.config import trl_args

    rm = reward_version(job)
    tok = load_tokenizer(job.parent_path)
    rm_tok = load_tokenizer(rm.path)
    args = trl_args(RLOOConfig, job.cfg, job.work_dir, job.precision)
    with_left = tok  # RLOO generates: it pads prompts on the left itself
    trainer = RLOOTrainer(
        model=load_policy(job.parent_path),
        reward_funcs=load_reward_model(rm.path, rm_tok),
        args=args,
        train_dataset=job.table(),
        processing_class=with_left,
        reward_processing_classes=rm_tok,
        peft_config=lora_config(job.cfg.lora),
    )
    job.train(trainer)
    return job.finish(merged(trainer.model), tok, extra={"reward_version": rm.name})


if __name__ == "__main__":
    sys.exit(main("rlhf", train))
