"""Time an ONNX model under DeepSparse; run by benchmarks/model.py with the python of .venv-deepsparse.

    .venv-deepsparse/bin/python benchmarks/deepsparse_runner.py MODEL.onnx INPUTS.npz OUT.npy --threads 2

INPUTS.npz holds the model's inputs in order (arr_0, arr_1, ...). Writes the first output to OUT.npy
and prints one line of JSON: DeepSparse's version, the median and all run times in ms. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no network here: no usage reporting

import deepsparse  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("output")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    with np.load(args.inputs) as data:
        inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
    start = time.perf_counter()
    engine = deepsparse.Engine(model=args.model, batch_size=inputs[0].shape[0], num_cores=args.threads)
    compile_s = time.perf_counter() - start
    out = engine.run(inputs)
    engine.run(inputs)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        engine.run(inputs)
        times.append((time.perf_counter() - start) * 1e3)
    np.save(args.output, out[0])
    print(
        json.dumps(
            {
                "version": deepsparse.__version__,
                "median_ms": float(np.median(times)),
                "times_ms": times,
                "compile_s": compile_s,
                "num_cores": engine.num_cores,
            }
        )
    )


if __name__ == "__main__":
    main()
