"""Training throughput of every recipe against a bare PyTorch step of the same kind, on the same batch, same run.

    python -m benchmarks.train --json
    python -m benchmarks.train --recipes sft,dpo --steps 4

Why: before issue 7, TRL's defaults turned on bf16 autocast, which on CPUs without native bf16 made every matmul
~20x slower. A recipe may add bookkeeping around the step (metrics, logging, MLflow, gradient clipping) but the
step itself must stay close to what plain PyTorch does with the same model and batch: the target is
``ratio = tokens_per_s / baseline_tokens_per_s >= 0.8`` for every recipe.

How (one subprocess per phase, so each phase's ``peak_rss_mb`` is its own):

1. A temporary ``FLYWHEEL_HOME`` with the base model copied in and a real snapshot curated from simulated events
   (``tests/training/conftest.py``: ``simulated_events()`` + ``curate_into()``); MLflow's SQLite store is opened
   directly (``mlflow_port=1``).
2. ``recipe`` phase, per recipe: the recipe's own ``train`` function through ``training.runner.run_job`` (the
   code path of ``python -m training.recipes.<m>``) on its ``tiny`` config with ``train.max_steps=--steps``. A
   probe on the trainer times every optimizer step (``on_step_end`` to ``on_step_end``, so logging and the next
   batch's collation count) and keeps a copy of every batch the loss saw. The first ``--warmup`` steps are
   excluded. Tokens per step are counted on those batches (non-padding tokens the policy trains on; the
   trainer's own ``num_tokens`` counter is reported beside them).
3. ``baseline`` phase, per recipe: a bare fp32 PyTorch step of the same kind on the very same batches, with
   ``torch.optim.AdamW``: causal-LM loss (sft, pretrain); sequence classifier on chosen+rejected with the
   Bradley-Terry loss (reward); policy forward/backward plus the frozen reference forward (dpo; kto also runs its
   KL batch through both, no grad); ``generate`` of the same number of tokens + reward-model score + reference
   forward + RLOO policy step (rlhf, whose tokens are generated + scored ones).

The JSON records the load average: on a shared machine compare a recipe with its same-run baseline only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("pretrain", "sft", "reward", "rlhf", "dpo", "kto")
TARGET = 0.8


def _say(msg: str) -> None:
    print(f"[bench train] {msg}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------------------------------------------------
# Recipe phase: the real recipe, a probe on its trainer
# ---------------------------------------------------------------------------------------------------------
class Probe:
    """Times optimizer steps and keeps a copy of every training batch the trainer's loss saw, by step."""

    def __init__(self) -> None:
        self.t_begin = 0.0
        self.step_ends: list[float] = []
        self.batches: dict[int, list[dict[str, Any]]] = {}
        self.trainer_num_tokens: list[float] = []
        self.peak_rss_mb = 0.0
        self.args: dict[str, Any] = {}

    def attach(self, trainer) -> None:
        from transformers import TrainerCallback

        probe = self
        a = trainer.args
        self.args = {
            k: getattr(a, k, None)
            for k in ("learning_rate", "beta", "temperature", "num_generations", "gradient_accumulation_steps")
        }

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                probe.t_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                probe.step_ends.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "num_tokens" in logs:
                    probe.trainer_num_tokens.append(float(logs["num_tokens"]))

            def on_train_end(self, args, state, control, **kw):
                probe.peak_rss_mb = _peak_rss_mb()

        trainer.add_callback(Timer())
        compute_loss = trainer.compute_loss

        def capturing(model, inputs, *a, **kw):
            if model.training:
                self.batches.setdefault(trainer.state.global_step, []).append(_tensors(inputs))
            return compute_loss(model, inputs, *a, **kw)

        trainer.compute_loss = capturing

    def step_seconds(self) -> list[float]:
        marks = [self.t_begin, *self.step_ends]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def step_batches(self) -> list[list[dict[str, Any]]]:
        return [self.batches[k] for k in sorted(self.batches)]


def _tensors(inputs: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def count_tokens(recipe: str, micro_batches: list[dict[str, Any]]) -> int:
    """Non-padding tokens one step trains on (rlhf: generated + scored, i.e. completion + prompt + completion)."""
    n = 0
    for b in micro_batches:
        if recipe == "rlhf":
            n += int(b["prompt_mask"].sum()) + 2 * int(b["completion_mask"].sum())
        elif "attention_mask" in b:
            n += int(b["attention_mask"].sum())
        else:  # padding-free packing: one row of real tokens
            n += int(b["input_ids"].numel())
    return n


def recipe_phase(recipe: str, home: Path, snapshot: str, steps: int, out: Path) -> dict[str, Any]:
    import torch

    from feedback.settings import Settings
    from training import registry
    from training.runner import run_job

    settings = Settings(home=home, mlflow_port=1)
    module = importlib.import_module(f"training.recipes.{recipe}")
    probe = Probe()

    def body(job):
        train = job.train

        def probed(trainer):
            probe.attach(trainer)
            train(trainer)

        job.train = probed
        return module.train(job)

    overrides = [f"train.max_steps={steps}"]
    if recipe != "rlhf":
        overrides.append("data.max_eval_rows=4")  # evaluation is not timed; keep it short
    ns = argparse.Namespace(snapshot=snapshot, parent="base", config="tiny", json=False, overrides=overrides)
    load_before = _load()
    result = run_job(recipe, body, ns, settings)
    reward_path = None
    if recipe == "rlhf":
        rms = [v for v in registry.list_versions(settings) if v.kind == "reward" and not v.tainted]
        reward_path = rms[-1].path
    batches = probe.step_batches()
    torch.save(
        {
            "recipe": recipe,
            "steps": batches,
            "policy_path": str(settings.models_dir / "base"),
            "reward_path": reward_path,
            "args": probe.args,
            "precision": result["precision"],
        },
        out,
    )
    return {
        "version": result["version"],
        "precision": result["precision"],
        "step_seconds": probe.step_seconds(),
        "tokens_per_step": [count_tokens(recipe, b) for b in batches],
        "trainer_num_tokens": probe.trainer_num_tokens,
        "peak_rss_mb": probe.peak_rss_mb or _peak_rss_mb(),
        "load_avg_1m": [load_before, _load()],
        "batch_shapes": {k: list(v.shape) for k, v in batches[-1][0].items()} if batches else {},
    }


# ---------------------------------------------------------------------------------------------------------
# Baseline phase: bare PyTorch steps of the same kind on the same batches
# ---------------------------------------------------------------------------------------------------------
def _causal_lm(path: str, train: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train(train)
    if not train:
        model.requires_grad_(False)
    return model


def _completion_logps(model, input_ids, attention_mask, completion_mask):
    """Sum of log-probabilities of the completion tokens of each row (full logits, plain log_softmax)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (lp * completion_mask[:, 1:]).sum(-1)


def _optimizer(model, lr: float):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def baseline_step(data: dict[str, Any]):
    """A callable running one bare training step (all micro-batches, then the optimizer) for ``data['recipe']``."""
    import torch
    import torch.nn.functional as F

    recipe, args = data["recipe"], data["args"]
    lr = float(args.get("learning_rate") or 1e-5)
    beta = float(args.get("beta") or 0.1)
    path = data["policy_path"]

    if recipe == "reward":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model.train()

        def loss_of(b):
            r = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.squeeze(-1)
            chosen, rejected = r.chunk(2)
            return -F.logsigmoid(chosen - rejected).mean()

    elif recipe in ("sft", "pretrain"):
        model = _causal_lm(path, train=True)

        def loss_of(b):
            keys = ("input_ids", "attention_mask", "position_ids")
            labels = b.get("labels", b["input_ids"])
            return model(**{k: b[k] for k in keys if k in b}, labels=labels, use_cache=False).loss

    elif recipe == "dpo":
        model, ref = _causal_lm(path, train=True), _causal_lm(path, train=False)

        def loss_of(b):
            ids, mask, comp = b["input_ids"], b["attention_mask"], b["completion_mask"]
            pol = _completion_logps(model, ids, mask, comp)
            with torch.no_grad():
                old = _completion_logps(ref, ids, mask, comp)
            pc, pr = (pol - old).chunk(2)
            return -F.logsigmoid(beta * (pc - pr)).mean()

    elif recipe == "kto":
        model, ref = _causal_lm(path, train=True), _causal_lm(path, train=False)

        def loss_of(b):
            kl_args = (b["KL_input_ids"], b["KL_attention_mask"], b["KL_completion_mask"])
            with torch.no_grad():
                kl = (_completion_logps(model, *kl_args) - _completion_logps(ref, *kl_args)).mean().clamp(min=0)
                ref_lp = _completion_logps(ref, b["input_ids"], b["attention_mask"], b["completion_mask"])
            ratio = _completion_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"]) - ref_lp
            good = b["label"].bool()
            losses = torch.where(good, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio)))
            return losses.mean()

    elif recipe == "rlhf":
        model, ref = _causal_lm(path, train=True), _causal_lm(path, train=False)
        from transformers import AutoModelForSequenceClassification

        rm = AutoModelForSequenceClassification.from_pretrained(data["reward_path"], num_labels=1, dtype=torch.float32)
        rm.eval().requires_grad_(False)
        temperature = float(args.get("temperature") or 1.0)
        groups = int(args.get("num_generations") or 2)
        pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id

        def loss_of(b):
            prompt, pmask, cmask = b["prompt_ids"], b["prompt_mask"], b["completion_mask"]
            n = b["completion_ids"].size(1)
            with torch.no_grad():
                seq = model.generate(
                    input_ids=prompt,
                    attention_mask=pmask,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=pad,
                )
                mask = torch.cat([pmask, cmask], dim=1)
                score = rm(input_ids=seq, attention_mask=mask).logits.squeeze(-1)
                ref_lp = _completion_logps(ref, seq, mask, torch.cat([torch.zeros_like(pmask), cmask], dim=1))
            pol = _completion_logps(model, seq, mask, torch.cat([torch.zeros_like(pmask), cmask], dim=1))
            reward = (score - beta * (pol.detach() - ref_lp)).view(-1, groups)
            advantage = reward - (reward.sum(1, keepdim=True) - reward) / max(groups - 1, 1)  # leave-one-out
            return -(advantage.flatten() * pol).mean()

    else:
        raise ValueError(f"no baseline for recipe {recipe!r}")

    opt = _optimizer(model, lr)

    def step(micro_batches: list[dict[str, Any]]) -> None:
        for b in micro_batches:
            (loss_of(b) / len(micro_batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def baseline_phase(batches_file: Path, warmup: int) -> dict[str, Any]:
    import torch

    data = torch.load(batches_file, weights_only=False)
    inner = baseline_step(data)
    # the bare step runs in the recipe's precision (bf16: autocast, as TRL's bf16 does), so the ratio measures the
    # framework's overhead, not the precision's gain
    bf16 = data.get("precision") == "bf16"
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def step(b):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            inner(b)

    steps = data["steps"]
    load_before = _load()
    for b in steps[:warmup]:
        step(b)
    seconds = []
    for b in steps[warmup:]:
        t = time.perf_counter()
        step(b)
        seconds.append(time.perf_counter() - t)
    return {
        "step_seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "load_avg_1m": [load_before, _load()],
        "precision": "bf16" if bf16 else "fp32",
    }


# ---------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------
def make_home(root: Path) -> tuple[Path, str]:
    """A home with the base model copied in and a snapshot curated from simulated events."""
    from feedback.settings import Settings, get_settings
    from tests.training.conftest import curate_into, simulated_events

    base = get_settings().base_model_path
    if not (base / "config.json").exists():
        raise SystemExit(f"the base model is missing at {base}: run `make setup` first")
    home = root / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(base, home / "models" / "base")
    with contextlib.redirect_stdout(sys.stderr):
        snapshot = curate_into(Settings(home=home, mlflow_port=1), simulated_events())
    return home, snapshot


def _child(argv: list[str], result: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.train", *argv, "--result", str(result)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stderr, timeout=timeout, check=False)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"`{' '.join(cmd[2:])}` exited with {proc.returncode} (its output is above)")
    return json.loads(result.read_text())


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(recipe: str, rec: dict[str, Any], base: dict[str, Any], warmup: int) -> dict[str, Any]:
    tokens = rec["tokens_per_step"][warmup:]
    rec_s = rec["step_seconds"][warmup : warmup + len(tokens)]
    base_s = base["step_seconds"][: len(tokens)]
    tps = sum(tokens) / sum(rec_s) if rec_s else float("nan")
    btps = sum(tokens) / sum(base_s) if base_s else float("nan")
    num = rec["trainer_num_tokens"]
    trainer_tokens = [b - a for a, b in zip([0.0, *num], num, strict=False)][warmup:]
    return {
        "tokens_per_s": round(tps, 1),
        "s_per_step": round(_mean(rec_s), 3),
        "peak_rss_mb": rec["peak_rss_mb"],
        "baseline_tokens_per_s": round(btps, 1),
        "baseline_s_per_step": round(_mean(base_s), 3),
        "baseline_peak_rss_mb": base["peak_rss_mb"],
        "ratio": round(tps / btps, 3) if btps == btps and btps > 0 else None,
        "meets_target": bool(btps > 0 and tps / btps >= TARGET),
        "tokens_per_step": tokens,
        "trainer_num_tokens_per_step": trainer_tokens,
        "measured_steps": len(tokens),
        "precision": rec["precision"],
        "batch_shapes": rec["batch_shapes"],
        "load_avg_1m": {"recipe": rec["load_avg_1m"], "baseline": base["load_avg_1m"]},
    }


def _auto_probe(device: str, bf16_ok: bool) -> dict[str, Any] | None:
    """What ``auto`` based its pick on: the per-machine probe (``training.cpu_precision``), where it is asked."""
    if device != "cpu" or not bf16_ok:
        return None
    from training.cpu_precision import probe

    return probe()


def precision_phase(steps: int = 4, warmup: int = 1) -> dict[str, Any]:
    """One real training step of the base model in fp32 against the same step under bf16 autocast (what TRL's
    ``bf16=True`` does on a CPU, with ``use_cpu``), alternated so both see the same machine load.

    Why: ``precision: auto`` must pick the faster one on every CPU this project runs on (issue 19). bf16 is only
    timed where the CPU has native bf16 (AVX512-BF16 or AMX) or on a GPU; elsewhere the record says why not."""
    import torch

    from training.config import cpu_bf16_supported, resolve_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16_ok = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_bf16_supported()
    out: dict[str, Any] = {
        "device": device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_supported": bool(bf16_ok),
        "auto_picks": resolve_precision("auto"),
        "auto_probe": _auto_probe(device, bf16_ok),
        "batch": "2 x 256 tokens, AdamW, fp32 master weights",
        "load_avg_1m_at_start": _load(),
    }
    model = _causal_lm(str(REPO / ".flywheel" / "models" / "base"), train=True).to(device)
    opt = _optimizer(model, 1e-5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 256), generator=gen).to(device)
    precisions = ["fp32", "bf16"] if bf16_ok else ["fp32"]
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for i in range(warmup + steps):
        for prec in precisions:
            t = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[prec].append(time.perf_counter() - t)
    for prec, ts in times.items():
        out[f"{prec}_s_per_step"] = round(sorted(ts)[len(ts) // 2], 3)
        out[f"{prec}_steps"] = [round(t, 3) for t in ts]
    if bf16_ok:
        out["faster"] = "bf16" if out["bf16_s_per_step"] < out["fp32_s_per_step"] else "fp32"
        out["bf16_speedup"] = round(out["fp32_s_per_step"] / out["bf16_s_per_step"], 2)
    else:
        out["faster"] = "fp32"
        out["bf16_not_timed"] = "no native bf16 on this CPU (AVX512-BF16 or AMX) and no GPU"
    out["auto_is_faster"] = out["auto_picks"] == out["faster"]
    out["load_avg_1m_at_end"] = _load()
    return out


def run_all(
    recipes: list[str],
    steps: int,
    warmup: int,
    timeout: float,
    keep: bool,
    out_file: Path | None = None,
    precision: bool = True,
) -> dict[str, Any]:
    import torch
    import transformers
    import trl

    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-train-"))
    out: dict[str, Any] = {
        "benchmark": "train",
        "mode": "each phase in its own subprocess; recipes through training.runner.run_job with their tiny configs",
        "steps": steps,
        "warmup_steps": warmup,
        "target_ratio": TARGET,
        "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "load_avg_1m_at_start": _load(),
    }
    try:
        _say(f"building a home with a curated snapshot under {root} ...")
        if not recipes:
            out["recipes"] = {}
            _say("precision: one real step in fp32 against bf16 autocast, alternated ...")
            out["precision"] = _child(["--phase", "precision"], root / "precision.json", timeout)
            return out
        home, snapshot = make_home(root)
        out["snapshot_id"] = snapshot
        if "rlhf" in recipes and "reward" not in recipes:
            recipes = ["reward", *recipes]  # rlhf optimises against the newest reward model: train one first
            out["setup_only"] = ["reward"]
        results: dict[str, Any] = {}
        for recipe in recipes:
            results[recipe] = one_recipe(recipe, root, home, snapshot, steps, warmup, timeout)
            if out_file is not None:  # a long run leaves what it has measured so far
                out_file.write_text(json.dumps({**out, "recipes": results, "complete": False}))
        for name in out.get("setup_only", []):
            results.pop(name, None)
        if precision:
            _say("precision: one real step in fp32 against bf16 autocast, alternated ...")
            out["precision"] = _child(["--phase", "precision"], root / "precision.json", timeout)
        out["recipes"] = results
        ok = {k: v for k, v in results.items() if "ratio" in v}
        out["checks"] = {
            "all_meet_target": bool(ok) and len(ok) == len(results) and all(v["meets_target"] for v in ok.values()),
            "below_target": sorted(k for k, v in ok.items() if not v["meets_target"]),
            "failed": sorted(k for k, v in results.items() if "error" in v),
        }
    finally:
        out["load_avg_1m_at_end"] = _load()
        if keep:
            _say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return out


def one_recipe(recipe: str, root: Path, home: Path, snapshot: str, steps: int, warmup: int, timeout: float) -> dict:
    batches = root / f"{recipe}-batches.pt"
    try:
        _say(f"{recipe}: recipe, {steps} steps (first {warmup} not timed) ...")
        rec = _child(
            ["--phase", "recipe", "--recipe", recipe, "--home", str(home), "--snapshot", snapshot]
            + ["--steps", str(steps), "--batches", str(batches)],
            root / f"{recipe}-recipe.json",
            timeout,
        )
        _say(f"{recipe}: bare PyTorch baseline on the same batches ...")
        base = _child(
            ["--phase", "baseline", "--batches", str(batches), "--warmup", str(warmup)],
            root / f"{recipe}-baseline.json",
            timeout,
        )
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        _say(f"{recipe}: failed: {e}")
        return {"error": str(e)}
    s = summarise(recipe, rec, base, warmup)
    _say(
        f"{recipe}: {s['tokens_per_s']} tok/s ({s['s_per_step']} s/step) vs bare {s['baseline_tokens_per_s']} tok/s: "
        f"ratio {s['ratio']}"
    )
    return s


def print_table(out: dict[str, Any]) -> None:
    pr = out.get("precision")
    if pr:
        bf = f"bf16 {pr['bf16_s_per_step']} s/step" if "bf16_s_per_step" in pr else pr.get("bf16_not_timed", "")
        print(
            f"precision ({pr['cpu_capability']}): fp32 {pr['fp32_s_per_step']} s/step, {bf}; faster {pr['faster']}, "
            f"auto picks {pr['auto_picks']} ({'right' if pr['auto_is_faster'] else 'WRONG'})"
        )
    print(
        f"train benchmark: {out['steps']} steps per recipe, first {out['warmup_steps']} not timed; "
        f"load {out['load_avg_1m_at_start']} -> {out['load_avg_1m_at_end']} on {out['cpu_threads']} threads"
    )
    print(f"{'recipe':9} {'tok/s':>8} {'s/step':>8} {'rss MB':>8} {'bare tok/s':>11} {'ratio':>6}  target {TARGET}")
    for name, r in out.get("recipes", {}).items():
        if "error" in r:
            print(f"{name:9} failed: {r['error']}")
            continue
        mark = "met" if r["meets_target"] else "NOT met"
        print(
            f"{name:9} {r['tokens_per_s']:>8} {r['s_per_step']:>8} {r['peak_rss_mb']:>8} "
            f"{r['baseline_tokens_per_s']:>11} {r['ratio']:>6}  {mark}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {','.join(RECIPES)}")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per recipe (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing (default 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one phase of one recipe may take")
    p.add_argument("--keep", action="store_true", help="keep the temporary home (models, MLflow store, batches)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--precision",
        choices=("also", "only", "no"),
        default="also",
        help="time one step in fp32 against bf16 autocast where the CPU has bf16 (only: nothing else)",
    )
    p.add_argument("--out", type=Path, help="also write the JSON here, after every recipe (partial until the end)")
    # internal: one phase in a child process
    for flag in ("--phase", "--recipe", "--home", "--snapshot", "--batches", "--result"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase:
        return _run_phase(a)
    recipes = [] if a.precision == "only" else [r.strip() for r in a.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or (not recipes and a.precision != "only"):
        p.error(f"unknown recipe(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(RECIPES)}")
    if a.steps <= a.warmup or a.warmup < 0:
        p.error("--steps must be larger than --warmup (at least one timed step), and --warmup at least 0")
    out = run_all(recipes, a.steps, a.warmup, a.timeout, a.keep, a.out, precision=a.precision != "no")
    if a.out:
        a.out.write_text(json.dumps({**out, "complete": True}))
    if a.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0 if not out.get("checks", {}).get("failed") else 1


def _run_phase(a: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr):
        if a.phase == "recipe":
            res = recipe_phase(a.recipe, Path(a.home), a.snapshot, a.steps, Path(a.batches))
        elif a.phase == "baseline":
            res = baseline_phase(Path(a.batches), a.warmup)
        elif a.phase == "precision":
            res = precision_phase()
        else:
            raise SystemExit(f"unknown phase {a.phase!r}")
    Path(a.result).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
