"""Recipe configs: one YAML file per (method, size), dotted ``key=value`` overrides, strict validation.

A config has a few sections, each with one owner, so a typo anywhere stops the run before any work starts:

- ``recipe`` (the method, must match the script), ``precision`` (``auto``: see ``resolve_precision``);
- ``data``: which snapshot table and how much of it (``RecipeData``);
- ``train``: passed verbatim to the TRL config dataclass of the method (``SFTConfig``, ``DPOConfig`` ...), so
  every TRL option is reachable and an unknown key is an error naming the closest real one;
- ``lora``: ``null`` for full fine-tuning, else ``peft.LoraConfig`` fields;
- ``model``: method-specific model options (``RecipeModel``).

The resolved config (after overrides) is hashed (``config_hash``) and saved beside the weights and in MLflow.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from training.cpu_precision import cpu_auto_precision, cpu_bf16_supported
from training.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS = ("pretrain", "sft", "reward", "rlhf", "dpo", "kto")
Precision = Literal["auto", "fp32", "bf16", "fp16"]


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class RecipeData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    table: str = Field(description="Snapshot table: sft, kto, pairs, prompts (or 'corpus' for pretrain).")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many training rows (None: all).")
    max_eval_rows: int | None = Field(64, ge=1, description="Held-out rows for the eval loss (None: all).")
    policy: Literal["any", "parent"] = Field(
        "any", description="'parent': only rows whose answers the parent version wrote (on-policy)."
    )
    corpus: str | None = Field(None, description="Pretrain only: a plain-text file, paragraphs split by blank lines.")
    min_rows: int = Field(1, ge=1, description="Refuse to train on fewer rows than this.")
    safety_mix: int = Field(
        0, ge=0, le=4096, description="Add this many rows of training/data/safety.jsonl (see training/safety.py)."
    )
    safety_refusal_share: float = Field(0.5, ge=0, le=1, description="Share of the safety rows that are refusals.")
    weighting: Literal["resample", "ignore"] = Field(
        "resample",
        description="A snapshot row's `weight` (its provenance: an AI trainer's, a reviewer's or a user's judgment, "
        "pipelines/curate/judgments.py): 'resample' counts it that many times (floor(w) copies plus one more with "
        "probability frac(w), seeded; 0 drops it), so every TRL trainer learns from it in proportion; 'ignore'.",
    )


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reward_version: str | None = Field(
        None, description="rlhf: the registered reward model to optimise against (default: the newest one)."
    )


class RecipeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    recipe: Literal[METHODS]  # type: ignore[valid-type]
    precision: Precision = "auto"
    seed: int = 0
    data: RecipeData
    train: dict[str, Any] = Field(default_factory=dict)
    lora: dict[str, Any] | None = None
    model: RecipeModel = Field(default_factory=RecipeModel)


def config_path(method: str, size: str = "tiny") -> Path:
    return CONFIG_DIR / method / f"{size}.yaml"


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.learning_rate=1e-5)")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw else None
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        value = float(value)  # YAML 1.1 reads 2e-5 (no dot) as a string; a learning rate is meant
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def load_config(path: Path | str, overrides: list[str] | None = None, method: str | None = None) -> RecipeConfig:
    path = Path(path)
    if not path.exists():
        known = sorted(str(p.relative_to(CONFIG_DIR.parent.parent)) for p in CONFIG_DIR.glob("*/*.yaml"))
        raise ConfigError(f"config {path} does not exist; known configs: {', '.join(known)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = RecipeConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            hint = _closest(err["loc"], raw) if err["type"] == "extra_forbidden" else ""
            problems.append(f"{loc}: {err['msg']}{hint}")
        raise ConfigError(f"config {path}: " + "; ".join(problems)) from None
    if method is not None and cfg.recipe != method:
        raise ConfigError(f"config {path} is for recipe {cfg.recipe!r}, not {method!r}: pass a {method} config")
    return cfg


def _closest(loc: tuple, raw: dict[str, Any]) -> str:
    model: type[BaseModel] = RecipeConfig
    for part in loc[:-1]:
        sub = model.model_fields.get(str(part))
        ann = getattr(sub, "annotation", None) if sub else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def config_dict(cfg: RecipeConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_hash(cfg: RecipeConfig) -> str:
    blob = json.dumps(config_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trl_args(cls: type, cfg: RecipeConfig, output_dir: Path, precision: str, **fixed: Any) -> Any:
    """The method's TRL config from the ``train`` section; unknown keys are named with the closest real one.

    Precision is not a ``train`` key: it is decided once (``resolve_precision``) and set here, because TRL's
    configs default to bf16 autocast, which runs ~20x slower on CPUs without native bf16."""
    names = {f.name for f in fields(cls)}
    for key in cfg.train:
        if key not in names:
            match = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean {match[0]!r}?)" if match else ""
            raise ConfigError(f"train.{key} is not an option of {cls.__name__}{hint}")
        if key in ("bf16", "fp16", "output_dir", "report_to"):
            raise ConfigError(f"train.{key} is set by the recipe runner (use precision: / the CLI), remove it")
    kwargs = {
        **cfg.train,
        **fixed,
        "output_dir": str(output_dir),
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "seed": cfg.seed,
    }
    if precision == "bf16" and not _cuda_available():
        # transformers refuses bf16 on a CPU unless told the run is meant for the CPU
        kwargs["use_cpu"] = True
    kwargs.setdefault("save_strategy", "no")
    kwargs.setdefault("logging_steps", 1)
    # a NaN loss must reach the progress callback, not be averaged away (HF filters it by default)
    kwargs.setdefault("logging_nan_inf_filter", False)
    kwargs.setdefault("disable_tqdm", True)  # our progress callback prints steps, loss and ETA
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train section rejected by {cls.__name__}: {e}") from e


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_precision(requested: str = "auto") -> str:
    """The one place that decides training and evaluation precision from the hardware.

    ``auto``: bf16 on a CUDA device that supports it (else fp16); on a CPU, ``cpu_auto_precision`` (the one
    measured faster on this machine). An explicit ``bf16`` on a CPU needs native bf16; the trainer
    then runs with ``use_cpu`` (``trl_args``), without which transformers refuses bf16 on a CPU."""
    import torch

    cuda = torch.cuda.is_available()
    if requested != "auto":
        if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision bf16 asked for, but this GPU has no bf16: use precision: fp16 or auto")
        if requested == "bf16" and not cuda and not cpu_bf16_supported():
            raise ConfigError(
                "precision bf16 asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX): "
                "use precision: auto or fp32"
            )
        if requested == "fp16" and not cuda:
            raise ConfigError("precision fp16 needs a CUDA device: use precision: auto or fp32 on CPU")
        return requested
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cpu_auto_precision()
