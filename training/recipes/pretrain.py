"""Continued pre-training: next-token training on a plain-text corpus, cleaned first (``training/corpus.py``).

The essay's first stage, at the scale of a fine-tune: the corpus is a file (``data.corpus``), deduplicated and
filtered before use, packed into ``train.max_length`` blocks. ``--snapshot`` is optional here (recorded in the
lineage when given); the corpus, not the users' chats, is the data.

    python -m training.recipes.pretrain --parent production --config tiny data.corpus=/path/to/text.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

from training.modeling import load_policy, load_tokenizer, lora_config, merged
from training.runner import Job, TrainingError, main

REPO = Path(__file__).resolve().parents[2]


def train(job: Job):
    import datasets
    import mlflow
    from trl import SFTConfig, SFTTrainer

    from training.config import trl_args
    from training.corpus import load_corpus

    if not job.cfg.data.corpus:
        raise TrainingError("pretrain needs data.corpus: a plain-text file (e.g. training/data/corpus_tiny.txt)")
    try:
        docs, report = load_corpus(job.cfg.data.corpus, REPO)
    except FileNotFoundError as e:
        raise TrainingError(str(e)) from None
    mlflow.log_dict(report.__dict__, "corpus_report.json")
    mlflow.log_metrics({"corpus_documents_in": report.documents_in, "corpus_documents_out": report.documents_out})
    n_eval = min(job.cfg.data.max_eval_rows or 0, len(docs) // 5)
    if len(docs) - n_eval < job.cfg.data.min_rows:
        raise TrainingError(
            f"the corpus has {len(docs)} usable documents after cleaning ({report.dropped}): "
            "give data.corpus a larger file"
        )
    train_docs, eval_docs = docs[n_eval:], docs[:n_eval]
    tok = load_tokenizer(job.parent_path)
    args = trl_args(SFTConfig, job.cfg, job.work_dir, job.precision, dataset_text_field="text")
    trainer = SFTTrainer(
        model=load_policy(job.parent_path),
        args=args,
        processing_class=tok,
        peft_config=lora_config(job.cfg.lora),
        train_dataset=datasets.Dataset.from_dict({"text": train_docs}),
        eval_dataset=datasets.Dataset.from_dict({"text": eval_docs}) if eval_docs else None,
    )
    job.train(trainer)
    if trainer.eval_dataset is not None:
        job.metrics.update(trainer.evaluate())
    return job.finish(
        merged(trainer.model), tok, extra={"corpus": str(job.cfg.data.corpus), "corpus_report": report.__dict__}
    )


if __name__ == "__main__":
    sys.exit(main("pretrain", train))
