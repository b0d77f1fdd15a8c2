"""What trainer data does to the model (issue 18's benchmark, its last item).

    python -m benchmarks.labeling --effect --json        (or: python -m benchmarks.labeling_effect --json)

Two SFT candidates are trained from the base model on the same number of judgments of the same training prompts
(the shipped prompt set's ``train`` split, ``cli/data/prompts.jsonl``), and measured against each other and the base
on items neither saw:

- **end users alone**: each judgment is one simulated user's thumbs on one sampled answer (``cli.simulate``'s
  people: a form taste, and they miss 10-20% of errors); curation keeps what they liked as SFT rows, as the
  product's does;
- **AI trainers**: each judgment is one simulated trainer's compare-and-rewrite task on the same prompt's K sampled
  answers. A trainer of accuracy ``p`` (0.95 down to 0.5, as in ``benchmarks/labeling.py``) writes a right answer
  with probability ``p`` (the prompt's hand-written example, or its first accepted answer in a sentence); otherwise
  they keep the answer they ranked first, right or not. The rewrite is the SFT row (``pipelines/curate/judgments``).

Both train with the product's recipe row (``training/defaults.py``: SFT, 16 steps at 1e-4, the safety mix) in a
scratch home (MLflow's SQLite store). Measured, paired on identical items (``training/paired.py``):
- **held-out correctness**: greedy answers to the prompt set's ``heldout`` split, judged by each item's own check
  (``PromptItem.judge``: accepted answers, key facts, instructions, refusal where harmful), as the demo's held-out
  users judge them, without their noise;
- the gate's **capability figures** (``training/capability.py``): reference QA, reference-answer NLL, multiple
  choice and instruction following on the project's held-out suites.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cli.prompt_set import PromptItem, load_prompt_set
from cli.simulate import Answer, SimConfig, SimUser
from feedback.settings import Settings, get_settings
from training import capability, registry
from training.defaults import recipe_overrides
from training.gate_config import GateConfig
from training.measure import generate
from training.modeling import left_padded, load_policy, load_tokenizer
from training.paired import paired_binary

# Small enough for one run near 15 minutes on 2 cores, large enough that a 10-point difference in held-out
# correctness is about two standard errors.
EVAL = GateConfig(max_refqa_items=96, max_ifeval_items=24, max_new_tokens=48)


def ideal_answer(item: PromptItem) -> str:
    """What a careful trainer writes: the item's hand-written example, else its accepted answer in a sentence."""
    if item.example:
        return item.example
    return f"The answer is {item.accepted[0]}."


@torch.inference_mode()
def sample_answers(model, tok, items: list[PromptItem], k: int, max_new_tokens: int, seed: int) -> list[list[str]]:
    """``k`` sampled answers per prompt (temperature 0.8, as the app serves), in order."""
    torch.manual_seed(seed)
    out: list[list[str]] = []
    with left_padded(tok):
        for s in range(0, len(items), 8):
            chunk = items[s : s + 8]
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": i.prompt}], tokenize=False, add_generation_prompt=True
                )
                for i in chunk
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=0.8,
                num_return_sequences=k,
                pad_token_id=tok.pad_token_id,
            )
            dec = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out += [[d.strip() for d in dec[j * k : (j + 1) * k]] for j in range(len(chunk))]
    return out


def conv(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def user_rows(items: list[PromptItem], samples: list[list[str]], seed: int) -> tuple[list[dict], dict[str, Any]]:
    """One simulated user per prompt rates the first sample; what they liked becomes an SFT row."""
    rows, liked_right, liked = [], 0, 0
    for n, (item, answers) in enumerate(zip(items, samples, strict=True)):
        user = SimUser(None, SimConfig(seed=seed), n, items)
        a = user.assess(Answer(f"t{n}", answers[0], "stop", "base"), item)
        felt, _ = user.perceive(a)
        if felt > user.taste.threshold:
            liked += 1
            liked_right += a.correct
            rows.append({"messages": conv(item.prompt, a.text), "model_version": "base", "source": "user",
                         "judge": None, "weight": 1.0})  # fmt: skip
    return rows, {"judgments": len(items), "sft_rows": liked, "rows_right": liked_right}


def trainer_rows(items: list[PromptItem], samples: list[list[str]], seed: int) -> tuple[list[dict], dict[str, Any]]:
    """One simulated trainer per prompt (accuracies 0.95 .. 0.5 in turn) ranks the K samples and writes the best
    answer: right with probability p, else their top-ranked sample as it stands."""
    rng = random.Random(seed)
    accuracies = [0.95, 0.85, 0.75, 0.65, 0.5]
    rows, right = [], 0
    for n, (item, answers) in enumerate(zip(items, samples, strict=True)):
        p = accuracies[n % len(accuracies)]
        if rng.random() < p:
            text = ideal_answer(item)
        else:  # a careless pass: the sample they ranked first (by substance with probability p, else at random)
            ranked = sorted(answers, key=lambda a: not item.judge(a).correct) if rng.random() < p else answers
            text = ranked[0]
        right += item.judge(text).correct
        rows.append({"messages": conv(item.prompt, text), "model_version": "base", "source": "trainer",
                     "judge": f"trainer-{n % len(accuracies)}", "weight": 1.0})  # fmt: skip
    return rows, {"judgments": len(items), "sft_rows": len(rows), "rows_right": right}


def write_arm_snapshot(settings: Settings, arm: str, train: list[dict], held: list[dict]) -> str:
    from pipelines.curate import LAYOUT, Curated
    from pipelines.snapshots import write_snapshot

    tables = {t: {s: [] for s in splits} for t, splits in LAYOUT.items()}
    tables["sft"] = {"train": train, "eval": held}
    cur = Curated(tables, [], {"benchmark": "labeling_effect", "arm": arm}, {}, {"arm": arm}, "none", {})
    return write_snapshot(cur, settings.datasets_dir).snapshot_id


def train_arm(settings: Settings, sid: str) -> str:
    from training.recipes import sft
    from training.runner import run_job

    a = argparse.Namespace(
        snapshot=sid, parent="base", config="tiny", json=True, overrides=list(recipe_overrides("sft"))
    )
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs: keep stdout for --json
        return run_job("sft", sft.train, a, settings)["version"]


def measure_model(path: str, held: list[PromptItem], suites: capability.Suites) -> dict[str, Any]:
    """Greedy answers to the held-out prompts and the capability suites, and the likelihoods."""
    tok, model = load_tokenizer(path), load_policy(path).eval()
    convs = [[{"role": "user", "content": i.prompt}] for i in held]
    answers = generate(model, tok, convs, EVAL.max_new_tokens, EVAL.batch_size)
    caps = suites.prompts()
    cap_answers = {
        "refqa": generate(model, tok, caps["refqa"], EVAL.refqa_max_new_tokens, EVAL.batch_size),
        "ifeval": generate(model, tok, caps["ifeval"], EVAL.ifeval_max_new_tokens, EVAL.batch_size),
    }
    return {
        "correct": [i.judge(a).correct for i, a in zip(held, answers, strict=True)],
        "words": sum(len(a.split()) for a in answers) / max(len(answers), 1),
        "cap_answers": cap_answers,
        "lik": capability.likelihoods(model, tok, suites),
        "samples": [{"prompt": i.prompt, "answer": a} for i, a in zip(held[:3], answers[:3], strict=True)],
    }


def compare(a: dict[str, Any], b: dict[str, Any], suites: capability.Suites) -> dict[str, Any]:
    """``a`` against ``b`` on identical items: held-out correctness and every capability metric."""
    scores = {k: capability.item_scores(suites, m["cap_answers"], m["lik"], EVAL) for k, m in (("a", a), ("b", b))}
    return {
        "heldout_correctness": paired_binary(a["correct"], b["correct"]),
        "capability": capability.compare(scores["a"], scores["b"]),
    }


def run(judgments: int = 60, k: int = 3, seed: int = 1, say=print) -> dict[str, Any]:
    t0 = time.monotonic()
    items = load_prompt_set("train")
    random.Random(seed).shuffle(items)
    train_items, held_sft = items[:judgments], items[judgments : judgments + 8]
    held = load_prompt_set("heldout")
    suites = capability.Suites.load(EVAL)
    base_src = get_settings().base_model_path
    if not (base_src / "model.safetensors").exists():
        raise SystemExit(f"no base model at {base_src}: run `make setup` first")
    with tempfile.TemporaryDirectory(prefix="flywheel-labeling-effect-") as tmp:
        settings = Settings(home=Path(tmp) / "home", mlflow_port=1)
        shutil.copytree(base_src, settings.base_model_path, ignore=shutil.ignore_patterns("gguf", "eval_cache"))
        base_tok, base_model = load_tokenizer(settings.base_model_path), load_policy(settings.base_model_path).eval()
        say(f"[effect] sampling {k} answers to each of {len(train_items)} training prompts from the base model ...")
        samples = sample_answers(base_model, base_tok, train_items, k, EVAL.max_new_tokens, seed)
        del base_model
        held_rows = [{"messages": conv(i.prompt, ideal_answer(i)), "model_version": "base", "source": "trainer",
                      "judge": None, "weight": 1.0} for i in held_sft]  # fmt: skip
        arms: dict[str, dict[str, Any]] = {}
        for arm, build in (("users", user_rows), ("trainers", trainer_rows)):
            rows, info = build(train_items, samples, seed)
            say(f"[effect] {arm}: {info['judgments']} judgments -> {info['sft_rows']} SFT rows "
                f"({info['rows_right']} right); training SFT ...")  # fmt: skip
            t = time.monotonic()
            version = train_arm(settings, write_arm_snapshot(settings, arm, rows, held_rows))
            arms[arm] = info | {"version": version, "path": registry.get_version(settings, version).path,
                                "train_s": round(time.monotonic() - t, 1)}  # fmt: skip
        measured = {}
        for name, path in (("base", str(settings.base_model_path)), *((a, arms[a]["path"]) for a in arms)):
            say(f"[effect] measuring {name} on {len(held)} held-out prompts and the capability suites ...")
            measured[name] = measure_model(path, held, suites)
        out = {
            "judgments": judgments,
            "k": k,
            "seed": seed,
            "heldout_items": len(held),
            "suite_items": {"refqa": len(suites.refqa), "ifeval": len(suites.ifeval), "mc": len(suites.mc)},
            "arms": {a: {k2: v for k2, v in arms[a].items() if k2 != "path"} for a in arms},
            "heldout_correctness": {n: round(sum(m["correct"]) / len(m["correct"]), 4) for n, m in measured.items()},
            "mean_words": {n: round(m["words"], 1) for n, m in measured.items()},
            "trainers_vs_users": compare(measured["trainers"], measured["users"], suites),
            "trainers_vs_base": compare(measured["trainers"], measured["base"], suites),
            "users_vs_base": compare(measured["users"], measured["base"], suites),
            "samples": {n: m["samples"] for n, m in measured.items()},
        }
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def summary_lines(out: dict[str, Any]) -> list[str]:
    c = out["heldout_correctness"]
    tu = out["trainers_vs_users"]["heldout_correctness"]
    lines = [
        f"{out['judgments']} judgments per arm (K={out['k']} answers per trainer task); held-out correctness on "
        f"{out['heldout_items']} prompts: base {c['base']:.3f}, users {c['users']:.3f}, trainers {c['trainers']:.3f}",
        f"trainers - users: {tu['diff']:+.3f} (SE {tu['se']}, McNemar p {tu['p_value']})",
    ]
    for pair in ("trainers_vs_users", "trainers_vs_base", "users_vs_base"):
        cap = out[pair]["capability"]
        figures = ", ".join(f"{m} {s['diff']:+.3f} (SE {s['se']})" for m, s in cap.items() if s.get("diff") is not None)
        lines.append(f"{pair}: {figures}")
    lines.append(f"{out['seconds']:.0f} s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judgments", type=int, default=60, help="judgments per arm (one training prompt each)")
    ap.add_argument("-k", type=int, default=3, help="answers per trainer task")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = run(a.judgments, a.k, a.seed, say=(lambda m: None) if a.json else print)
    print(json.dumps(out) if a.json else "\n".join(summary_lines(out)))


if __name__ == "__main__":
    main()
