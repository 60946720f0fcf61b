"""Quantized sparse layers against the same f32 sparse layer, dense f32 and torch's dynamically
quantized dense int8 linear (``torch.ao.quantization.quantize_dynamic``), same process; then
all-MiniLM-L6-v2 with int8 sparse layers (activations quantized per token, or by calibrated static
scales, with or without the next layer's quantization fused into intermediate.dense's kernel) and
bf16 ones against dense f32 eager, with the errors of the last hidden states and the
sentence-embedding cosine against the f32 sparse model.

Each layer time is the median of --reps calls, the configurations of one row interleaved call by
call (so that a burst of load on these shared machines hits them alike). "int8" is the whole
layer: the per-token quantization of the activations plus the kernel; "int8 kernel" the
kernel alone on pre-quantized activations; "bf16" includes casting the activations to bf16, "bf16
kernel" is the kernel alone on bf16 activations.

    .venv/bin/python benchmarks/quantized.py [--threads 2] [--reps 30] [--tokens 128 512 1024]
        [--backend tvm] [--int8 "BSR(1, 4)" llvm] [--bf16 "BSR(1, 2)" llvm] [--no-model] [--quick]
        [--out benchmarks/quantized.json]

``--int8 FORMAT BACKEND`` gives the int8 layers (and the int8 models) their own format and backend,
``--bf16 FORMAT BACKEND`` the bf16 ones, the f32 ones keeping BSR(4, 1) on ``--backend``: ``BSR(1,
4)`` int8 and ``BSR(1, 2)`` bf16 on ``llvm`` are the kernels whose blocks the dot-product
instructions fit (``ir/dot_products.py``). Each quantized layer's (and model's) error is against
the f32 one of its own pattern.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sparsedsl as sd  # noqa: E402

# isort: split
import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sparsedsl.backends.host import present  # noqa: E402
from sparsedsl.backends.tvm.cpu import host_cpu  # noqa: E402
from sparsedsl.runtime.ops import nn_program  # noqa: E402
from sparsedsl.runtime.quantized import QuantizedSparseLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BERT = [(768, 768), (3072, 768), (768, 3072)]  # (N, K): attention, intermediate, output
FORMAT, SPARSITY = "BSR(4, 1)", 0.9
CLOCK = [time.perf_counter]  # main() puts time.thread_time here for --cpu-time


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``reps`` times after two warm-up rounds,
    on ``CLOCK`` (wall time, or the calling thread's CPU time: ``--cpu-time``)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for round_ in range(reps + 2):
            for name, fn in fns.items():
                start = CLOCK[0]()
                fn()
                if round_ >= 2:
                    times[name].append(CLOCK[0]() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_row(n: int, k: int, tokens: int, backend: str, reps: int, quantized_as: dict[str, tuple[str, str]]) -> dict:
    """One layer shape at ``tokens`` tokens; ``quantized_as``: each dtype's (format, backend)."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
    f32 = sd.SparseLinear.from_linear(linear, FORMAT, SPARSITY, nn_program(None, "cpu", backend))
    int8, bf16 = (
        QuantizedSparseLinear.from_linear(linear, fmt, dtype, SPARSITY, nn_program(None, "cpu", on))
        for dtype, (fmt, on) in quantized_as.items()
    )
    dense = f32.to_dense()
    dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(dense), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(tokens, k, generator=gen)
    xq, sx = int8.quantize(x)
    xb = x.bfloat16()
    kernel, weight = int8.program.kernels[int8.kernel], int8.sparse_weight()
    bkernel, bweight = bf16.program.kernels[bf16.kernel], bf16.sparse_weight()
    fns = {
        "f32 sparse": lambda: f32(x),
        "int8": lambda: int8(x),
        "int8 kernel": lambda: kernel(xq, sx, weight, int8.weight_scale, int8.bias),
        "bf16": lambda: bf16(x),
        "bf16 kernel": lambda: bkernel(xb, bweight, bf16.bias),
        "dense f32": lambda: dense(x),
        "torch dynamic int8": lambda: dynamic(x),
    }
    times = interleaved(fns, reps)
    # each quantized layer's error against the f32 sparse layer of its own pattern
    with torch.inference_mode():
        ref = f32(x)
        errors = {"torch dynamic int8": (dynamic(x) - ref).abs()}
        for name, layer in (("int8", int8), ("bf16", bf16)):
            same = f32 if layer.format == FORMAT else sd.SparseLinear.from_linear(linear, layer.format, SPARSITY)
            errors[name] = (layer(x) - same(x)).abs()
    base = times["f32 sparse"]
    return {
        "n": n,
        "k": k,
        "tokens": tokens,
        "ms": {name: t * 1e3 for name, t in times.items()},
        "vs_f32_sparse": {name: t / base for name, t in times.items()},
        "int8_vs_torch_dynamic": times["int8"] / times["torch dynamic int8"],
        "max_error": {name: e.max().item() for name, e in errors.items()},
        "mean_error": {name: e.mean().item() for name, e in errors.items()},
        "output_scale": ref.abs().max().item(),
    }


# The static int8 models' rules (a model block: the dict form has no ``fuse``): every encoder layer
# int8 with a calibrated input scale; "fused" also computes intermediate.dense's GELU in its kernel,
# which then writes output.dense's int8 input (runtime/requantize.py finds the pair).
STATIC_RULES = """
kernel linear(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {{
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}}
kernel linear_gelu(X: f32[M, K], W: f32[N, K] @ CSR, b: f32[N]) -> (Y: f32[M, N]) {{
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}}
model minilm {{
    {gelu}
    linear "encoder.layer.*" use linear with {format} sparsity {sparsity} dtype int8 static
}}
"""
FUSED_GELU = (
    'linear "*.intermediate.dense" use linear_gelu with {format} sparsity {sparsity} '
    'fuse "*.intermediate_act_fn" dtype int8 static'
)
INT8_MODELS = ("int8 sparse", "int8 static", "int8 static fused")


def static_rules(fmt: str, fused: bool) -> str:
    gelu = FUSED_GELU.format(format=fmt, sparsity=SPARSITY) if fused else ""
    return STATIC_RULES.format(gelu=gelu, format=fmt, sparsity=SPARSITY)


def hidden_errors(model, reference, inputs: list[dict]) -> tuple[float, float]:
    """Max and mean |error| of ``model``'s last hidden states against ``reference``'s over the
    tokens of ``inputs`` (padding left out)."""
    errors = []
    with torch.no_grad():
        for batch in inputs:
            keep = batch["attention_mask"].bool()
            errors.append((model(**batch).last_hidden_state - reference(**batch).last_hidden_state)[keep].abs())
    every = torch.cat([e.flatten() for e in errors])
    return every.max().item(), every.mean().item()


def model_rows(backend: str, reps: int, quantized_as: dict[str, tuple[str, str]], quick: bool = False) -> dict:
    """MiniLM at 8 x 128 (2 x 32 with ``quick``): dense f32 eager, f32 sparse, int8 (dynamic,
    static, static with the fused next-layer quantization) and bf16 sparse (90% BSR(4, 1) on every
    encoder linear layer, magnitude pruning), timed interleaved; against the f32 sparse model, the
    max and mean error of the last hidden states and the cosine of the sentence embeddings of 256
    held-out sentences (32 with ``quick``); the static scales from 64 other sentences (16). With
    quantized layers of another format, the f32 sparse model of that format too, their own
    reference (``cosine_vs_own_f32``)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from sentences import batches, cosine, embed, measure, minilm

    model, tokenizer = minilm()
    rule = {"format": FORMAT, "sparsity": SPARSITY}
    models = {"dense f32": model}
    int8_as = quantized_as["int8"]
    models["f32 sparse"] = sd.compile_model(model, {"encoder.layer.*": rule}, backend=backend)
    for dtype, (fmt, on) in quantized_as.items():
        spec = {**rule, "format": fmt, "dtype": dtype}
        models[f"{dtype} sparse"] = sd.compile_model(model, {"encoder.layer.*": spec}, backend=on)
    sentences = measure(
        models["f32 sparse"], tokenizer, seed=0, calibration=16 if quick else 64, held_out=32 if quick else 256
    )
    calibration = batches(tokenizer, sentences.calibration_texts, 16)
    for name, fused in (("int8 static", False), ("int8 static fused", True)):
        rules = static_rules(int8_as[0], fused)
        models[name] = sd.compile_model(model, rules, backend=int8_as[1], calibration=calibration)
    owns = {name: quantized_as["bf16" if name == "bf16 sparse" else "int8"] for name in (*INT8_MODELS, "bf16 sparse")}
    for fmt, on in set(owns.values()):
        if fmt != FORMAT:
            models[f"f32 {fmt}"] = sd.compile_model(model, {"encoder.layer.*": {**rule, "format": fmt}}, backend=on)
    shape = (2, 32) if quick else (8, 128)
    ids = torch.randint(1000, 20000, shape, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times = interleaved({name: (lambda m=m: m(**inputs)) for name, m in models.items()}, reps)
    base = times["dense f32"]
    out = {"shape": list(shape), "ms": {n: t * 1e3 for n, t in times.items()}}
    out["speedup_vs_dense"] = {n: base / t for n, t in times.items()}
    out["cosine_vs_f32_sparse"] = {n: cosine(models[n], sentences.held_out, sentences.reference) for n in models}
    errors = {n: hidden_errors(models[n], models["f32 sparse"], sentences.held_out) for n in models}
    out["max_error_vs_f32_sparse"] = {n: e[0] for n, e in errors.items()}
    out["mean_error_vs_f32_sparse"] = {n: e[1] for n, e in errors.items()}
    dense_ref = embed(model, sentences.held_out)
    out["cosine_vs_dense"] = {n: cosine(models[n], sentences.held_out, dense_ref) for n in models}
    refs = {
        fmt: sentences.reference if fmt == FORMAT else embed(models[f"f32 {fmt}"], sentences.held_out)
        for fmt, _ in owns.values()
    }
    out["cosine_vs_own_f32"] = {n: cosine(models[n], sentences.held_out, refs[fmt]) for n, (fmt, _) in owns.items()}
    out["fused_pairs"] = sum("emits" in r.note for r in sd.report(models["int8 static fused"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--backend", default="tvm", choices=("tvm", "llvm"))
    for dtype in ("int8", "bf16"):
        parser.add_argument(
            f"--{dtype}",
            nargs=2,
            metavar=("FORMAT", "BACKEND"),
            default=[FORMAT, None],
            help=f"format and backend of the {dtype} layers (default: BSR(4, 1) on --backend)",
        )
    parser.add_argument("--no-model", action="store_true", help="only the layer table")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a check that it runs: 16 tokens, 3 repetitions, MiniLM at 2 x 32 with 32 held-out sentences",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the calling thread's CPU time (with --threads 1 every kernel and torch op runs on it): "
        "steady on a loaded machine, where wall time measures the other processes",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "quantized.json")
    args = parser.parse_args()
    quantized_as = {dtype: (fmt, on or args.backend) for dtype, (fmt, on) in (("int8", args.int8), ("bf16", args.bf16))}
    int8_as, bf16_as = quantized_as["int8"], quantized_as["bf16"]
    if args.quick:
        args.tokens, args.reps = [16], 3
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time counts one thread's time: use it with --threads 1")
        CLOCK[0] = time.thread_time
    vnni = sorted(f for f in present() if "vnni" in f or "bf16" in f)
    clock = "CPU time of the calling thread" if args.cpu_time else "wall time"
    print(f"{host_cpu()}, {args.threads} threads, backend {args.backend}, dot-product extensions: {vnni or 'none'}")
    print(f"timed: {clock}")
    print(f"\n{FORMAT} {SPARSITY:.0%}: time / f32 sparse layer time (lower is better)")
    print(f"int8 layers: {int8_as[0]} {SPARSITY:.0%} on the {int8_as[1]} backend")
    print(f"bf16 layers: {bf16_as[0]} {SPARSITY:.0%} on the {bf16_as[1]} backend")
    head = (
        f"{'N x K':<11} {'tokens':>6} {'f32 ms':>7} {'int8':>6} {'kernel':>7} {'bf16':>6} {'kernel':>7} {'dense':>6} "
    )
    print(head + f"{'torch dyn':>9} {'int8/dyn':>8}  max |err| int8, bf16 (of max |y|)")
    rows = []
    for n, k in BERT:
        for tokens in args.tokens:
            r = layer_row(n, k, tokens, args.backend, args.reps, quantized_as)
            rows.append(r)
            v, e = r["vs_f32_sparse"], r["max_error"]
            print(
                f"{n}x{k:<6} {tokens:>6} {r['ms']['f32 sparse']:>7.2f} {v['int8']:>6.2f} {v['int8 kernel']:>7.2f} "
                f"{v['bf16']:>6.2f} {v['bf16 kernel']:>7.2f} {v['dense f32']:>6.2f} {v['torch dynamic int8']:>9.2f} "
                f"{r['int8_vs_torch_dynamic']:>8.2f}  {e['int8']:.3g}, {e['bf16']:.3g} (of {r['output_scale']:.3g})",
                flush=True,
            )
    result = {"cpu": host_cpu(), "threads": args.threads, "backend": args.backend, "dot_product": vnni, "clock": clock}
    result |= {dtype: {"format": fmt, "backend": on} for dtype, (fmt, on) in quantized_as.items()}
    result["layers"] = rows
    if not args.no_model:
        m = model_rows(args.backend, 2 if args.quick else max(5, args.reps // 3), quantized_as, args.quick)
        result["minilm"] = m
        batch, tokens = m["shape"]
        formats = f"int8: {int8_as[0]}, bf16: {bf16_as[0]}"
        print(f"\nMiniLM, {batch} x {tokens} tokens, every encoder layer 90% BSR(4, 1) ({formats}):")
        print("errors of the last hidden states and cosine of the sentence embeddings against the f32 sparse model:")
        for name in m["ms"]:
            print(
                f"  {name:<18} {m['ms'][name]:8.1f} ms  {m['speedup_vs_dense'][name]:5.2f}x dense  max |err| "
                f"{m['max_error_vs_f32_sparse'][name]:.3g}, mean {m['mean_error_vs_f32_sparse'][name]:.3g}  cosine "
                f"{m['cosine_vs_f32_sparse'][name]:.4f} vs f32 sparse, {m['cosine_vs_dense'][name]:.4f} vs dense"
            )
        print(f"  int8 static fused: {m['fused_pairs']} layers write the next layer's int8 input")
        for name, own in m["cosine_vs_own_f32"].items():
            print(f"  {name} against the f32 model of its own pattern: cosine {own:.4f}")
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
