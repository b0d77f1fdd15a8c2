"""GGUF exports of model versions, made on first load and cached beside the weights.

The llama.cpp engine reads GGUF, while training writes safetensors checkpoints. So that every registered version
can be served without a manual step, the first load of a version converts it with llama.cpp's own converter
(``convert_hf_to_gguf.py`` and the ``gguf-py`` it was written against, both taken from the llama-cpp-python sdist
by ``make setup``) into ``<version>/gguf/model-<precision>.gguf``. A fingerprint of the source files sits beside
each export, so a rewritten checkpoint is converted again; a file lock lets concurrent loaders (the app and a
benchmark) convert once; the export is written to a temporary name and renamed, so a crash never leaves a
half-written file that looks finished.

    python -m app.backends.gguf .flywheel/models/base [--precision q8_0]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

Precision = Literal["f32", "f16", "bf16", "q8_0"]
PRECISIONS: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
CONVERTER_DIR = Path(sys.prefix) / "share" / "llama.cpp"  # filled by `make setup` from the llama-cpp-python sdist
_SOURCES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class ConversionError(RuntimeError):
    """The checkpoint could not be exported to GGUF; the message says why and what to do."""


def fingerprint(model_dir: Path) -> str:
    """Names, sizes and modification times of the files a conversion reads (weights by size/mtime, not content:
    hashing 500 MB on every load would cost seconds)."""
    h = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / n for n in _SOURCES if (model_dir / n).exists()]
    if not any(f.suffix == ".safetensors" for f in files):
        raise ConversionError(f"{model_dir} has no *.safetensors weights to convert")
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def export_path(model_dir: Path, precision: str) -> Path:
    return model_dir / "gguf" / f"model-{precision}.gguf"


def ensure_gguf(model_dir: str | Path, precision: str = "q8_0", converter_dir: Path | None = None) -> Path:
    """The GGUF export of ``model_dir`` at ``precision``, converting (once, under a lock) if it is missing or stale."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").exists():
        raise ConversionError(f"{model_dir} is not a model directory (no config.json)")
    out = export_path(model_dir, precision)
    stamp = out.with_suffix(".json")
    want = fingerprint(model_dir)
    if _fresh(out, stamp, want):
        return out
    out.parent.mkdir(exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same version right now
        if _fresh(out, stamp, want):
            return out
        _convert(model_dir, precision, out, converter_dir or CONVERTER_DIR)
        stamp.write_text(json.dumps({"fingerprint": want, "precision": precision, "created_at": time.time()}))
    return out


def _fresh(out: Path, stamp: Path, want: str) -> bool:
    try:
        return out.exists() and json.loads(stamp.read_text()).get("fingerprint") == want
    except (OSError, ValueError):
        return False


def _convert(model_dir: Path, precision: str, out: Path, converter_dir: Path) -> None:
    script = converter_dir / "convert_hf_to_gguf.py"
    if not script.exists():
        raise ConversionError(
            f"llama.cpp's converter is missing ({script}); run `make setup`, which installs llama-cpp-python "
            "and copies its convert_hf_to_gguf.py there"
        )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    env = {**os.environ, "PYTHONPATH": str(converter_dir / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", precision, "--outfile", str(tmp)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not tmp.exists():
            tail = (done.stderr or done.stdout)[-1500:]
            raise ConversionError(f"converting {model_dir} to GGUF {precision} failed:\n{tail}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="a model version directory (safetensors, config, tokenizer)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: the serving precision (settings)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.precision is None:
        from feedback.settings import get_settings

        args.precision = get_settings().serve_precision
    t = time.perf_counter()
    try:
        path = ensure_gguf(args.model_dir, args.precision)
    except (ConversionError, ValueError) as e:
        print(json.dumps({"error": str(e)}) if args.json else f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    took = round(time.perf_counter() - t, 1)
    if args.json:
        print(json.dumps({"path": str(path), "precision": args.precision, "seconds": took}))
    else:
        print(f"{path} ({path.stat().st_size / 1e6:.0f} MB, {took} s)")


if __name__ == "__main__":
    main()
