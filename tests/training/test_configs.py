"""Recipe configs, precision and corpus cleaning: no services, no model weights."""

from __future__ import annotations

import pytest

from training.config import (
    CONFIG_DIR,
    CPU_AUTO_PRECISION,
    METHODS,
    ConfigError,
    load_config,
    resolve_precision,
    trl_args,
)
from training.corpus import load_corpus
from training.recipes import TRL_CONFIGS

CONFIGS = sorted(CONFIG_DIR.glob("*/*.yaml"))


def test_every_method_has_a_tiny_and_a_gpu_config():
    assert {p.parent.name for p in CONFIGS} == set(METHODS)
    for m in METHODS:
        assert (CONFIG_DIR / m / "tiny.yaml").exists() and (CONFIG_DIR / m / "gpu.yaml").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_builds_its_trl_config(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"training.recipes.{path.parent.name}" in first, "configs open with their command"
    cfg = load_config(path, method=path.parent.name)
    args = trl_args(TRL_CONFIGS[cfg.recipe](), cfg, tmp_path, "fp32")
    assert args.bf16 is False and args.fp16 is False and args.output_dir == str(tmp_path)


def test_overrides_and_typos_are_named(tmp_path):
    path = CONFIG_DIR / "dpo" / "tiny.yaml"
    cfg = load_config(path, ["train.beta=0.3", "data.max_rows=5", "lora.r=8", "train.learning_rate=2e-5"])
    assert cfg.train["beta"] == 0.3 and cfg.data.max_rows == 5 and cfg.lora == {"r": 8}
    assert cfg.train["learning_rate"] == 2e-5  # YAML 1.1 alone would read "2e-5" as a string
    with pytest.raises(ConfigError, match="did you mean 'max_rows'"):
        load_config(path, ["data.max_row=5"])
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        trl_args(TRL_CONFIGS["dpo"](), load_config(path, ["train.lerning_rate=1"]), tmp_path, "fp32")
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(path, ["train.beta"])
    with pytest.raises(ConfigError, match="is for recipe 'dpo', not 'kto'"):
        load_config(path, method="kto")
    with pytest.raises(ConfigError, match="set by the recipe runner"):
        trl_args(TRL_CONFIGS["dpo"](), load_config(path, ["train.bf16=true"]), tmp_path, "fp32")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_precision_follows_the_hardware():
    import torch

    if not torch.cuda.is_available():
        # fp32 on every CPU: bf16 autocast was never faster on the CPUs measured (training/config.py)
        assert resolve_precision("auto") == CPU_AUTO_PRECISION == "fp32"
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            resolve_precision("fp16")
    assert resolve_precision("fp32") == "fp32"


def test_the_shipped_corpus_is_cleaned_before_use():
    docs, report = load_corpus("training/data/corpus_tiny.txt", CONFIG_DIR.parents[1])
    assert report.documents_in == report.documents_out + sum(report.dropped.values())
    assert report.dropped.get("exact_duplicate", 0) >= 2
    assert {"links", "not_prose", "too_short", "boilerplate"} <= set(report.dropped)
    assert not any("http" in d for d in docs) and len(set(docs)) == len(docs)
