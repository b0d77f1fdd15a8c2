"""Which precision trains faster on this CPU: measured once per machine, then read from a small cache file.

CPUs of the same machine kind disagree. On the AVX2-only AMD EPYC bf16 autocast is ~20x slower than fp32 (no
native bf16: every bf16 op is emulated). On the AMD EPYC Zen 4 (AVX512-BF16), idle, one real training step of the
default model took 1.66 s in bf16 against 3.15 s in fp32 (``python -m benchmarks.train --precision only``,
``benchmarks/results/train_precision.json``). On the Intel Xeon (AVX512-BF16, AMX absent) an earlier matmul test
found bf16 slower (65 against 86 GFLOP/s). A rule by CPU flag would be wrong on one of them, so ``precision:
auto`` asks this probe, which times one transformer MLP block (the default model's shapes, forward and backward,
1,024 tokens) in each precision, alternating so both see the same load, and keeps bf16 only when it is at least
``MIN_SPEEDUP`` faster. On the Zen 4 the block is 3.4-5.2x faster in bf16 where the whole step is 1.9x (attention's
softmax, the norms and the optimizer stay fp32), hence the margin.

The result is cached per CPU model, thread count and torch version under ``~/.cache/flywheel/`` (one probe for every
process of a test run, under a file lock), so the pick is stable on a machine and trained fixtures keyed by it stay
valid. ``FLYWHEEL_CPU_PRECISION=fp32|bf16`` overrides it.

    python -m training.cpu_precision [--remeasure] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from training.errors import ConfigError

MIN_SPEEDUP = 1.5
PROBE_VERSION = 1
ENV = "FLYWHEEL_CPU_PRECISION"


def cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flywheel" / "cpu_precision.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    return f"v{PROBE_VERSION}|{_cpu_model()}|{cap}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def measure(reps: int = 12, tokens: int = 1024) -> dict[str, Any]:
    """Milliseconds for one MLP block's forward and backward in fp32 and under bf16 autocast (medians)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.SiLU(), torch.nn.Linear(1536, 576))
    x = torch.randn(tokens, 576, generator=gen)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(reps + 2):  # the first two rounds warm oneDNN's kernels up and are not kept
        for prec in ("fp32", "bf16"):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = block(x).float().square().mean()
            loss.backward()
            block.zero_grad(set_to_none=True)
            if i >= 2:
                times[prec].append(time.perf_counter() - t)
    fp32, bf16 = (statistics.median(times[p]) * 1e3 for p in ("fp32", "bf16"))
    speedup = fp32 / bf16
    return {
        "fp32_ms": round(fp32, 2),
        "bf16_ms": round(bf16, 2),
        "bf16_speedup": round(speedup, 2),
        "min_speedup": MIN_SPEEDUP,
        "pick": "bf16" if speedup >= MIN_SPEEDUP else "fp32",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def probe(remeasure: bool = False) -> dict[str, Any]:
    """This machine's record (measured now if missing, or if ``remeasure``): ``pick`` is what ``auto`` trains in.

    Only meaningful where the CPU has native bf16; ``training.config`` does not ask otherwise."""
    from filelock import FileLock

    path, key = cache_file(), machine_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            known = json.loads(path.read_text())
            if not isinstance(known, dict):
                known = {}
        except (OSError, ValueError):
            known = {}  # missing or damaged: measure again rather than trust it
        rec = known.get(key)
        if remeasure or not isinstance(rec, dict) or rec.get("pick") not in ("fp32", "bf16"):
            rec = measure()
            known[key] = rec
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            tmp.replace(path)
    return {"key": key, "cache": str(path), **rec}


def cpu_auto_precision() -> str:
    """What ``auto`` trains in on this CPU: fp32 without native bf16; with it, whichever ``training.cpu_precision``
    measured faster on this machine (bf16 1.9x faster per real step on the EPYC Zen 4, slower on the Xeon measured
    earlier); ``FLYWHEEL_CPU_PRECISION=fp32|bf16`` overrides the probe."""
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ConfigError(f"{ENV}={forced!r} is not a CPU precision: use fp32 or bf16, or unset it")
        if forced == "bf16" and not cpu_bf16_supported():
            raise ConfigError(f"{ENV}=bf16, but this CPU has no native bf16 (AVX512-BF16 or AMX): use fp32")
        return forced
    if not cpu_bf16_supported():
        return "fp32"
    return probe()["pick"]


def cpu_bf16_supported() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX): the only CPUs where a bf16 run is allowed at all."""
    import torch

    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Which precision `precision: auto` trains in on this CPU, and why.")
    ap.add_argument("--remeasure", action="store_true", help="measure again and replace this machine's record")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    out: dict[str, Any] = {"bf16_supported": cpu_bf16_supported()}
    if out["bf16_supported"]:
        out["probe"] = probe(a.remeasure)
    out["auto"] = cpu_auto_precision()
    out["override"] = os.environ.get(ENV) or None
    if a.json:
        print(json.dumps(out))
        return 0
    if not out["bf16_supported"]:
        print(f"auto: {out['auto']} (no native bf16 on this CPU: bf16 is never faster here)")
        return 0
    p = out["probe"]
    print(
        f"auto: {out['auto']}{' (forced by ' + ENV + ')' if out['override'] else ''}; probe: fp32 {p['fp32_ms']} ms, "
        f"bf16 {p['bf16_ms']} ms, bf16 {p['bf16_speedup']}x (needs {p['min_speedup']}x), measured {p['measured_at']} "
        f"at load {p['load_avg_1m']}; cached in {p['cache']} (--remeasure to redo)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
