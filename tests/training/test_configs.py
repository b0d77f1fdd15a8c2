"""Recipe configs, precision and corpus cleaning: no services, no model weights."""

from __future__ import annotations

import json

import pytest

from training.config import (
    CONFIG_DIR,
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


def test_precision_follows_the_hardware(monkeypatch, tmp_path):
    import torch

    from training.config import cpu_bf16_supported
    from training.cpu_precision import ENV, cache_file, probe

    assert resolve_precision("fp32") == "fp32"
    if torch.cuda.is_available():
        return
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_precision("fp16")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a fresh machine: the probe measures, then reads
    if not cpu_bf16_supported():
        # no native bf16: emulated bf16 is ~20x slower, so auto never asks the probe
        assert resolve_precision("auto") == "fp32" and not cache_file().exists()
        monkeypatch.setenv(ENV, "bf16")
        with pytest.raises(ConfigError, match="no native bf16"):
            resolve_precision("auto")
    else:
        picked = resolve_precision("auto")
        rec = probe()  # read back, not measured again
        assert picked == rec["pick"] and cache_file().exists()
        assert rec["pick"] == ("bf16" if rec["bf16_speedup"] >= rec["min_speedup"] else "fp32")
        monkeypatch.setenv(ENV, "bf16")
        assert resolve_precision("auto") == "bf16"
        print(f"[precision] auto picks {picked} here: bf16 {rec['bf16_speedup']}x in the probe")
    monkeypatch.setenv(ENV, "fp32")
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setenv(ENV, "fp8")
    with pytest.raises(ConfigError, match="not a CPU precision"):
        resolve_precision("auto")


def test_a_damaged_precision_record_is_measured_again(monkeypatch, tmp_path):
    from training.cpu_precision import cache_file, machine_key, probe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache_file().parent.mkdir(parents=True)
    cache_file().write_text("{not json")
    rec = probe()
    assert rec["pick"] in ("fp32", "bf16") and machine_key() in cache_file().read_text()
    cache_file().write_text(json.dumps({machine_key(): {"pick": "fp64"}}))
    assert probe()["pick"] in ("fp32", "bf16")


def test_the_shipped_corpus_is_cleaned_before_use():
    docs, report = load_corpus("training/data/corpus_tiny.txt", CONFIG_DIR.parents[1])
    assert report.documents_in == report.documents_out + sum(report.dropped.values())
    assert report.dropped.get("exact_duplicate", 0) >= 2
    assert {"links", "not_prose", "too_short", "boilerplate"} <= set(report.dropped)
    assert not any("http" in d for d in docs) and len(set(docs)) == len(docs)
