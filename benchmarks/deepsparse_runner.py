"""Time an ONNX model under DeepSparse; run by benchmarks/model.py with the python of .venv-deepsparse.

    .venv-deepsparse/bin/python benchmarks/deepsparse_runner.py MODEL.onnx INPUTS.npz OUT.npy --threads 2

INPUTS.npz holds the model's inputs in order (arr_0, arr_1, ...). Compiles the model, writes the first
output to OUT.npy and prints one line of JSON: DeepSparse's version, the compile time and the cores.
Then serves timings until stdin closes: for each line ``n`` read, it runs the model ``n`` times and
prints their times in ms as one JSON list (so that model.py can time it in rounds alternating with
its other rows: a machine whose speed drifts slows every row alike). Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    args = parser.parse_args()

    with np.load(args.inputs) as data:
        inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
    start = time.perf_counter()
    engine = deepsparse.Engine(model=args.model, batch_size=inputs[0].shape[0], num_cores=args.threads)
    compile_s = time.perf_counter() - start
    np.save(args.output, engine.run(inputs)[0])
    info = {"version": deepsparse.__version__, "compile_s": compile_s, "num_cores": engine.num_cores}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            engine.run(inputs)
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
