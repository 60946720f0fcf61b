"""compile_model's attention rules: the attention modules a rule matches run sparsedsl's attention
kernels through transformers' AttentionInterface (dense, or on a block pattern), the others SDPA;
a decoder's causal calls go to SDPA and its decoding steps (one query, a KV cache) to the kernel;
``sd.report`` lists the attention modules and the fused ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.runtime import attention as module
from sparsedsl.runtime.attention import BlockPattern
from tests.strategies import fuzz_examples

transformers = pytest.importorskip("transformers")

EXAMPLES = Path(__file__).parents[2] / "examples"
LINEAR = """
kernel linear(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
"""


def _bert(layers: int = 2):
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _padded_batch(vocab: int, tokens: int = 70):
    ids = torch.randint(0, vocab, (3, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, tokens, dtype=torch.long)
    mask[1, 40:], mask[2, 3:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def calls(monkeypatch):
    """The shapes of q in the calls of sd.attention (the kernels) from transformers' models."""
    seen = []
    attention = module.attention
    monkeypatch.setattr(module, "attention", lambda q, *a, **k: seen.append(tuple(q.shape)) or attention(q, *a, **k))
    return seen


def _run(model, batch):
    with torch.inference_mode():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize(
    "rules",
    [
        LINEAR + 'model m {\n    attention "encoder.layer.*.attention.self"\n}',
        {"encoder.layer.*.attention.self": {"attention": True}},
    ],
    ids=["sdsl", "dict"],
)
def test_bert_with_padding_computes_as_without_the_rule(rules, calls):
    model = _bert()
    batch = _padded_batch(model.config.vocab_size)
    compiled = sd.compile_model(model, rules)
    assert (_run(compiled, batch) - _run(model, batch)).abs().max() <= 2e-4
    assert len(calls) == 2
    assert model.config._attn_implementation == "sdpa"  # the user's model is left as it was


def test_modules_no_rule_matches_run_sdpa(calls):
    model = _bert()
    batch = _padded_batch(model.config.vocab_size)
    compiled = sd.compile_model(model, {"encoder.layer.1.attention.self": {"attention": True}})
    assert (_run(compiled, batch) - _run(model, batch)).abs().max() <= 2e-4
    assert len(calls) == 1
    assert [a.module for a in sd.report(compiled).attention] == ["encoder.layer.1.attention.self"]


def test_a_window_reaching_every_key_is_dense_attention(calls):
    model = _bert()
    batch = _padded_batch(model.config.vocab_size)
    rules = LINEAR + 'model m {\n    attention "*.attention.self" with BSR(16, 16) window 512\n}'
    compiled = sd.compile_model(model, rules)
    calls.clear()  # compile_model's call building the kernel
    assert (_run(compiled, batch) - _run(model, batch)).abs().max() <= 2e-4
    assert calls == [(3, 4, 80, 16)] * 2  # 70 tokens padded to the blocks
    (row, _) = sd.report(compiled).attention
    assert (row.kernel, row.pattern, row.density, row.tokens) == ("block_attention", "BSR(16, 16) window 512", 1, 512)


SETTINGS = settings(max_examples=fuzz_examples(8), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    tokens=st.integers(1, 70),
    keys=st.integers(1, 70),
    block=st.sampled_from([(8, 8), (16, 8), (4, 16)]),
    window=st.integers(0, 40),
    padded=st.integers(0, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_pattern_is_masked_sdpa_on_the_blocks_near_the_diagonal(tokens, keys, block, window, padded, seed):
    """The blocks holding a query and a key at most ``window`` apart, with the key padding: SDPA
    with that mask, a row with no key giving zeros."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, tokens, 8, generator=gen)
    k, v = (torch.randn(2, 3, keys, 8, generator=gen) for _ in range(2))
    keep = torch.ones(2, keys, dtype=torch.bool)
    keep[1, min(padded, keys - 1) :] = False
    pattern = BlockPattern(f"BSR({block[0]}, {block[1]})", window)
    t, s = torch.arange(tokens)[:, None] // block[0], torch.arange(keys)[None, :] // block[1]
    first_t, first_s = t * block[0], s * block[1]
    gap = torch.maximum(first_s - (first_t + block[0] - 1), first_t - (first_s + block[1] - 1)).clamp(min=0)
    mask = (gap <= window) & keep[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    want = torch.where(mask.any(-1, keepdim=True), want, torch.zeros(()))
    torch.testing.assert_close(pattern.attend(q, k, v, keep, 0.3), want, rtol=1e-4, atol=1e-5)


def test_llama_generate_runs_the_kernel_at_each_decoding_step(calls, tiny_llama):
    """A causal model: the prompt's causal call goes to SDPA, each step's one query (against the
    KV cache, grouped keys repeated, left padding masked) to the kernel; the tokens are SDPA's."""
    model = tiny_llama
    compiled = sd.compile_model(model, {"model.layers.*.self_attn": {"attention": True}})
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    generate = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        assert torch.equal(compiled.generate(ids, **generate), model.generate(ids, **generate))
    assert calls == [(2, 4, 1, 16)] * (2 * 4)
    assert all(r.note.startswith("SDPA for calls of more than one query") for r in sd.report(compiled).attention)


def test_a_block_pattern_for_a_causal_module_is_refused_at_the_rule():
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    rules = LINEAR + 'model m {\n    attention "*.self_attn" with BSR(16, 16) window 32\n}'
    with pytest.raises(sd.SdslSemanticError, match="'model.layers.0.self_attn' is causal") as err:
        sd.compile_model(transformers.LlamaForCausalLM(config), rules)
    assert err.value.span.line == 6


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"*.attention": {"attention": True}}, r"matches no attention module .*'encoder.layer.0.attention.self'"),
        ({"*.self": {"attention": True, "window": 4}}, "a window applies to a block pattern"),
        ({"*.self": {"attention": "BSR(8, 8)"}}, 'a block pattern needs "window"'),
        ({"*.self": {"attention": "BSR(8, 8)", "window": -1}}, 'a block pattern needs "window"'),
        ({"*.self": {"attention": "NM(2, 4)", "window": 4}}, r"with NM\(2, 4\): cannot store"),
        ({"*.self": {"attention": "BSR(8)", "window": 4}}, "attention rule"),
        ({"*.self": {"attention": "CSC", "window": 4}}, "must store the token 't' as 't / b: dense' first"),
        ({"*.self": {"attention": True, "sparsity": 0.5}}, "is not an attention rule"),
    ],
)
def test_misfit_rules_are_refused_naming_the_rule(rules, message):
    with pytest.raises(sd.SdslError, match=message):
        sd.compile_model(_bert(1), rules)


def test_a_model_without_transformers_attention_is_refused():
    with pytest.raises(sd.SdslSemanticError, match="the model has none"):
        sd.compile_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"*": {"attention": True}})


def test_attention_modules_outside_a_transformers_model_are_refused():
    """A model's attention module alone: no model to select the "sdsl" implementation."""
    with pytest.raises(sd.SdslSemanticError, match=r"'0' is in no transformers model \(a module with set_attn"):
        sd.compile_model(torch.nn.Sequential(_bert(1).encoder.layer[0].attention.self), {"0": {"attention": True}})


def test_report_lists_attention_and_fused_modules():
    model = _bert()
    compiled = sd.compile_model(model, EXAMPLES / "minilm_fused.sdsl")  # with its attention rule
    report = sd.report(compiled)
    assert len(report) == 2 * 6 and all(r.sparse for r in report)
    assert [(a.module, a.kernel, a.pattern, a.density) for a in report.attention] == [
        (f"encoder.layer.{i}.attention.self", "attention", "dense", 1.0) for i in range(2)
    ]
    fused = {(f.module, f.kind, f.layer, f.kernel) for f in report.fused}
    assert (
        "encoder.layer.1.output.LayerNorm",
        "LayerNorm",
        "encoder.layer.1.output.dense",
        "linear_residual_norm",
    ) in fused
    assert (
        "encoder.layer.0.intermediate.intermediate_act_fn",
        "GELUActivation",
        "encoder.layer.0.intermediate.dense",
        "linear_gelu",
    ) in fused
    assert len(fused) == 2 * 3
    text = str(report)
    assert "encoder.layer.1.attention.self" in text and "fused module" in text and "into layer" in text
    batch = _padded_batch(model.config.vocab_size)
    assert _run(compiled, batch).shape == _run(model, batch).shape


BLOCK_RULE = """
format Band(b) = (t, s) -> (t / b: dense, s / b: compressed, t % b: dense, s % b: dense)
model m {
    attention "encoder.layer.*.attention.self" with Band(16) window 4
}
"""


@pytest.fixture(scope="module")
def block_build(tmp_path_factory):
    """An ahead-of-time build (llvm: it compiles fastest) of a block-pattern attention rule, in a
    format of the file (which nn.sdsl's kernels learn)."""
    out = tmp_path_factory.mktemp("aot")
    sd.build(BLOCK_RULE, out, backend="llvm")
    return out


def test_an_aot_build_runs_the_rules_block_attention_without_compiling(block_build, calls, monkeypatch):
    """The build holds the block kernels for the rule's format (in place and copied layouts, every
    index type); the model compiled from it computes what the one compiled from the source does,
    compiling nothing; a format it lacks is the BackendError naming the build."""
    from sparsedsl.backends.llvm import jit

    model = _bert()
    batch = _padded_batch(model.config.vocab_size, 40)
    want = _run(sd.compile_model(model, BLOCK_RULE, backend="llvm"), batch)
    monkeypatch.setattr(jit, "build", lambda *a, **k: pytest.fail("a kernel was compiled"))
    loaded = sd.compile_model(model, None, aot=block_build)
    calls.clear()
    torch.testing.assert_close(_run(loaded, batch), want, rtol=0, atol=1e-6)
    assert calls == [(3, 4, 48, 16)] * 2  # 40 tokens padded to the blocks
    assert [a.pattern for a in sd.report(loaded).attention] == ["Band(16) window 4"] * 2
    plan = getattr(loaded.encoder.layer[0].attention.self, module.PLAN)
    assert plan.program.aot == block_build
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(sd.BackendError, match=r"'block_attention' was not built ahead of time for BSR\(8, 8\)"):
        module.attention(q, q, q, plan.program.pack("BSR(8, 8)", torch.ones(32, 32)), program=plan.program)


def test_an_aot_build_refuses_a_format_the_attention_kernel_cannot_read(tmp_path):
    rules = 'model m {\n    attention "*" with CSC window 4\n}'
    with pytest.raises(sd.SdslSemanticError, match=r'attention rule "\*" with CSC: .*t / b: dense') as err:
        sd.build(rules, tmp_path, backend="llvm")
    assert err.value.span.line == 2


def test_attention_rules_for_a_gpu_are_refused_at_the_rule(tmp_path):
    """The attention kernels run on the CPU: a rule in a CUDA program is refused where it is
    written, by compile_model and by an AOT build alike, before anything compiles."""
    rules = 'model m {\n    attention "*.self"\n}'
    for attempt in (
        lambda: sd.compile_model(_bert(1), rules, target="cuda"),
        lambda: sd.build(rules, tmp_path, "cuda"),
    ):
        with pytest.raises(
            sd.SdslSemanticError, match='attention rule "\\*.self" runs the attention kernels on the CPU, not cuda'
        ) as err:
            attempt()
        assert err.value.span.line == 2


@pytest.mark.parametrize("heads_masks", [0, 1, 3])
def test_sd_attention_without_autograd_skips_the_op_and_computes_the_same(heads_masks, monkeypatch):
    """Outside autograd and tracing ``sd.attention`` calls the op's body directly (as
    ``SparseLinear`` does): the same numbers."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 32, 8, generator=gen) for _ in range(3))
    padding = torch.ones(2, 32, dtype=torch.bool)
    padding[1, 20:] = False
    pattern = BlockPattern("BSR(8, 8)", 9)
    masks = [pattern.mask(32, 32)] * heads_masks if heads_masks != 1 else pattern.mask(32, 32)
    masks = masks or None
    want = sd.attention(q, k, v, block_mask=masks, key_padding_mask=padding)
    monkeypatch.setattr(module, "attention_op", None)  # not called
    with torch.inference_mode():
        got = sd.attention(q, k, v, block_mask=masks, key_padding_mask=padding)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_compile_keeps_the_rules_attention_in_one_graph(calls):
    """An encoder's mask is made for one query row that all queries share (``padding_mask``), so
    that attention takes its key padding by its shape: under torch.compile, no graph break at each
    layer for a test of the mask's values. A mask of one row per query is still compared: rows that
    agree run the kernel, others SDPA."""
    model = _bert()
    batch = _padded_batch(model.config.vocab_size)
    compiled = sd.compile_model(model, {"encoder.layer.*.attention.self": {"attention": True}})
    with torch.inference_mode():
        got = torch.compile(lambda b: compiled(**b).last_hidden_state, fullgraph=True)(batch)
    assert (got - _run(model, batch)).abs().max() <= 2e-4
    layer = compiled.encoder.layer[0].attention.self
    q, (k, v) = torch.randn(2, 3, 4, 8), torch.randn(2, 2, 3, 5, 8).unbind(0)  # [B, H, T or S, D]
    keys = torch.rand(2, 5, generator=torch.Generator().manual_seed(2)) < 0.8
    keys[:, 0] = True
    rows = keys[:, None, None, :].expand(2, 1, 4, 5)
    cases = ((keys[:, None, None, :], 1), (rows, 1), (rows & torch.ones(4, 5).tril().bool(), 0))
    for mask, kernel_calls in cases:  # one row; rows that agree; rows that differ
        before = len(calls)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        torch.testing.assert_close(module.transformers_attention(layer, q, k, v, mask)[0], want, rtol=1e-4, atol=1e-5)
        assert len(calls) - before == kernel_calls, mask.shape


def test_the_shared_row_mask_keeps_the_shape_transformers_promises():
    """``padding_mask``: an encoder's mask is ``[B, 1, T, S]`` with its rows one row in memory (an
    encoder-decoder concatenates it with the decoder's own mask along the keys); a causal mask is
    transformers' own."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    keys = torch.ones(2, 7, dtype=torch.long)
    keys[1, 5:] = 0
    shared = module.padding_mask(
        batch_size=2, q_length=5, kv_length=7, mask_function=bidirectional_mask_function, attention_mask=keys
    )
    assert shared.shape == (2, 1, 5, 7) and shared.stride(2) == 0
    assert torch.equal(shared, keys.bool()[:, None, None, :].expand(2, 1, 5, 7))
    assert torch.cat([torch.ones(2, 1, 5, 5, dtype=torch.bool), shared], dim=-1).shape == (2, 1, 5, 12)
    causal = {"batch_size": 2, "q_length": 7, "kv_length": 7, "mask_function": causal_mask_function}
    causal["attention_mask"] = keys
    torch.testing.assert_close(module.padding_mask(**causal), sdpa_mask(**causal))
