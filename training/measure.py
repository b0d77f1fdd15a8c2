"""What the gate measures with a model in hand: greedy answers, reward scores, and teacher-forced likelihoods.

Everything here is batched and runs in fp32 under ``torch.inference_mode``. Generation sorts prompts by length
before batching (less left padding: on 2 CPU cores padding is most of the cost of a mixed batch) and returns the
answers in the original order. Likelihoods are per item, so two models can be compared item by item
(``training/paired.py``): the mean NLL per token of a reference answer given its question (teacher-forced,
so a model cannot lower it by answering briefly), and for a multiple-choice item the log-likelihood of each choice
given the question, summed and per token (``lm-eval``'s ``acc`` and a per-token ``acc_norm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from training.modeling import left_padded

Conversation = list[dict[str, str]]


@torch.inference_mode()
def generate(model, tok, conversations: Sequence[Conversation], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, one per conversation, in the given order."""
    texts = [tok.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: len(tok(texts[i], add_special_tokens=False)["input_ids"]))
    out: dict[int, str] = {}
    with left_padded(tok):
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            texts_out = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out.update({i: text.strip() for i, text in zip(idx, texts_out, strict=True)})
    return [out[i] for i in range(len(texts))]


@torch.inference_mode()
def reward_scores(
    rm, tok, conversations: Sequence[Conversation], answers: Sequence[str], batch: int = 16
) -> list[float]:
    scores: list[float] = []
    for i in range(0, len(answers), batch):
        texts = [
            tok.apply_chat_template([*c, {"role": "assistant", "content": a}], tokenize=False)
            for c, a in zip(conversations[i : i + batch], answers[i : i + batch], strict=True)
        ]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=512, add_special_tokens=False)
        scores += rm(**enc).logits[:, 0].float().tolist()
    return scores


def pair_scores(rm, tok, pairs: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The judge's scores of the chosen and the rejected answer of each held-out preference pair."""
    prompts = [list(p["prompt"]) for p in pairs]
    chosen = reward_scores(rm, tok, prompts, [p["chosen"][-1]["content"] for p in pairs])
    rejected = reward_scores(rm, tok, prompts, [p["rejected"][-1]["content"] for p in pairs])
    return chosen, rejected


def pair_accuracy(rm, tok, pairs: list[dict[str, Any]]) -> float | None:
    if not pairs:
        return None
    chosen, rejected = pair_scores(rm, tok, pairs)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


@torch.inference_mode()
def heldout_nll(model, tok, conversations: list[Conversation]) -> float | None:
    """Mean per-token negative log-likelihood of the final assistant message of each held-out conversation."""
    total, count = 0.0, 0
    for conv in conversations:
        if not conv or conv[-1]["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(conv, tokenize=False)
        n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
        ids = tok(full, return_tensors="pt", add_special_tokens=False, truncation=True, max_length=512)["input_ids"]
        labels = ids.clone()
        labels[:, :n_prefix] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * n
        count += n
    return total / count if count else None


@torch.inference_mode()
def continuation_logprobs(
    model, tok, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 32
) -> list[tuple[float, int]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation and its length."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: dict[int, tuple[float, int]] = {}
    pad = tok.pad_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):  # right padding: positions stay those of an unpadded sequence
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for r, i in enumerate(idx):
            ctx, cont = pairs[i]
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            out[i] = (float(logp[r, pos, torch.tensor(cont)].sum()), len(cont))
    return [out[i] for i in range(len(pairs))]


def answer_nlls(model, tok, items: Sequence[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """Per item, the mean NLL per token of ``answer`` after the chat-formatted ``question`` (teacher-forced)."""
    pairs = []
    for question, answer in items:
        prefix = tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        pairs.append(
            (tok(prefix, add_special_tokens=False)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"])
        )
    return [-lp / n for lp, n in continuation_logprobs(model, tok, pairs, batch_size)]


def choice_scores(model, tok, items: Sequence[dict[str, Any]], batch_size: int = 32) -> list[dict[str, Any]]:
    """Per multiple-choice item: which choice has the highest log-likelihood, summed and per token.

    The cloze form lighteval and lm-eval use for ARC and PIQA: context ``Question: ...\\nAnswer:``, continuation
    `` <choice>``, each tokenised separately (so every choice is scored on the same context tokens)."""
    pairs, owner = [], []
    for k, it in enumerate(items):
        ctx = tok(f"Question: {it['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        for choice in it["choices"]:
            pairs.append((ctx, tok(" " + choice, add_special_tokens=False)["input_ids"]))
            owner.append(k)
    scored = continuation_logprobs(model, tok, pairs, batch_size)
    out = []
    for k, it in enumerate(items):
        mine = [s for s, o in zip(scored, owner, strict=True) if o == k]
        raw = max(range(len(mine)), key=lambda j: mine[j][0])
        norm = max(range(len(mine)), key=lambda j: mine[j][0] / mine[j][1])
        out.append({"pick": raw, "pick_norm": norm, "correct": raw == it["label"], "correct_norm": norm == it["label"]})
    return out
