"""What structure validation costs: every sparse structure of a BERT-base-sized model (72 encoder
linears, 768/3072 wide) validated from fresh copies, against `compile_model`'s warm time (kernel
cache filled) on the same model. Validation runs where a structure comes from outside the packer
(`SparseTensor.from_structure`, `load_state_dict`); `compile_model` packs its own and trusts them.

    python benchmarks/validation.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import transformers

import sparsedsl as sd

ROOT = Path(__file__).resolve().parents[1]
FORMATS = [("BSR(4, 1)", 0.9), ("CSR", 0.9), ("NM(2, 4)", 0.5)]


def bert_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig()).eval()


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(model: torch.nn.Module, fmt: str, sparsity: float) -> dict:
    rules = {"encoder.*": (fmt, sparsity)}
    sd.compile_model(model, rules)  # fills the kernel cache
    warm = best_of(2, lambda: sd.compile_model(model, rules))
    sparse = sd.compile_model(model, rules)
    layers = [m for m in sparse.modules() if isinstance(m, sd.SparseLinear)]
    copies = [([b.clone() for b in m.structure()], m.values.detach().clone()) for m in layers]
    fmt_obj = layers[0].program.format(fmt)

    def validate_all():
        for m, (structure, values) in zip(layers, copies):
            stored = values.clone()  # a new values tensor: no stamp, so a full validation
            sd.SparseTensor.from_structure(fmt_obj, (m.out_features, m.in_features), structure, stored)

    clone_only = best_of(3, lambda: [values.clone() for _, values in copies])
    validate = best_of(3, validate_all) - clone_only
    nnz = sum(m.values.numel() for m in layers)
    return {"format": fmt, "layers": len(layers), "nnz": nnz, "compile_model_warm_s": warm, "validate_s": validate}


def main() -> None:
    model = bert_base()
    rows = [measure(model, fmt, sparsity) for fmt, sparsity in FORMATS]
    print(f"{'format':<10} {'layers':>6} {'nnz':>10} {'compile_model warm s':>21} {'validate s':>11} {'share':>7}")
    for r in rows:
        share = r["validate_s"] / r["compile_model_warm_s"]
        r["share"] = share
        print(
            f"{r['format']:<10} {r['layers']:>6} {r['nnz']:>10} {r['compile_model_warm_s']:>21.2f} "
            f"{r['validate_s']:>11.4f} {share:>7.2%}"
        )
    (ROOT / "benchmarks" / "validation.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
