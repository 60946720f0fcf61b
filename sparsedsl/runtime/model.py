"""``compile_model``: replace a model's ``nn.Linear`` layers by sparse ones, and run its attention
by sparsedsl's kernels, by rules."""

from __future__ import annotations

import copy
import fnmatch
import numbers
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sparsedsl.errors import ArgumentError, SdslError, SdslSemanticError, Source, Span
from sparsedsl.frontend import ast
from sparsedsl.frontend.check import ACTIVATION_SCALES, PRUNE_METHODS, quantized_activation
from sparsedsl.ir.formats import Format
from sparsedsl.runtime import ops, requantize
from sparsedsl.runtime.attention import DENSE, MASKED, BlockPattern, Dense, Plan, is_attention_module, select
from sparsedsl.runtime.calibrate import Layer, Seen, calibrate
from sparsedsl.runtime.fused import fuse_residual_norm
from sparsedsl.runtime.modules import SparseLinear
from sparsedsl.runtime.program import TORCH_DTYPES, Program, compile, index_types
from sparsedsl.runtime.prune import Gram, needs_inputs
from sparsedsl.runtime.quantized import QUANTIZED_DTYPES, STATIC_QUANTILE, QuantizedSparseLinear, static_scale
from sparsedsl.runtime.rules import AttentionRule, Rule, attention_rules_of, attention_target_problem, rules_of

# Above this density a sparse layer is not expected to beat dense F.linear on a CPU
# (docs/BENCHMARKS.md): such layers are kept dense and the report says so.
MAX_SPARSE_DENSITY = 0.55

DICT_FORMS = (
    '{glob: format}, {glob: (format, sparsity)} or {glob: {"format": format, "sparsity": sparsity, '
    '"prune": method, "dtype": dtype, "activations": scaling}}, with format a string such as "BSR(4, 1)", '
    f"sparsity None or a number in [0, 1), method one of {', '.join(PRUNE_METHODS)}, dtype one of "
    f"{', '.join(QUANTIZED_DTYPES)} and scaling (an int8 layer's inputs) one of {', '.join(ACTIVATION_SCALES)} "
    '(only format is required); for attention modules {glob: {"attention": True}} or {glob: {"attention": '
    'format, "window": tokens}}'
)
SPEC_KEYS = ("format", "sparsity", "prune", "dtype", "activations")
ATTENTION_KEYS = ("attention", "window")
# the tokens at which the report gives a block pattern's density, when the model's config names none
REPORT_TOKENS = 512
SHOWN = 3  # module names an error lists (per kind) before "..."


@dataclass(frozen=True)
class LayerReport:
    """What ``compile_model`` did with one layer: ``sparse``, or kept dense (``note`` says why)."""

    layer: str
    format: str
    density: float
    kernel: str
    sparse: bool
    note: str = ""
    dtype: str = "f32"  # the stored values': "int8" or "bf16" for a quantized layer


@dataclass(frozen=True)
class AttentionReport:
    """What ``compile_model`` did with one attention module: the ``kernel`` it runs (nn.sdsl's
    ``attention`` or ``block_attention``), its ``pattern`` ("dense" or the block pattern) and the
    fraction of the scores computed (``density``, at ``tokens`` x ``tokens``); ``note``: when it
    hands calls to SDPA."""

    module: str
    kernel: str
    pattern: str
    density: float
    tokens: int | None = None
    note: str = ""


@dataclass(frozen=True)
class FusedReport:
    """A module that a layer's kernel computes in its epilogue (``kind``: the module's class)."""

    module: str
    kind: str
    layer: str
    kernel: str


class Report(list):
    """``sd.report(model)``: the ``LayerReport`` of each compiled layer, a list, with the
    ``AttentionReport`` of each attention module a rule matched (``attention``) and the
    ``FusedReport`` of each module fused into a layer (``fused``); printed, tables."""

    def __init__(self, rows=(), attention=(), fused=()):
        super().__init__(rows)
        self.attention: list[AttentionReport] = list(attention)
        self.fused: list[FusedReport] = list(fused)

    def __str__(self) -> str:
        return format_report(self)


@dataclass(frozen=True)
class RuleSet:
    """The rules ``compile_model`` applies, with where each was written (for errors)."""

    rules: list[Rule]
    spans: list[Span | None]
    source: Source | None = None
    attention: list[AttentionRule] = field(default_factory=list)
    attention_spans: list[Span | None] = field(default_factory=list)

    def error(self, index: int, message: str) -> SdslSemanticError:
        """An error about rule ``index``, located at it when it was written in a .sdsl file."""
        return SdslSemanticError(f'rule "{self.rules[index].pattern}" {message}', self.spans[index], self.source)

    def attention_error(self, index: int, message: str) -> SdslSemanticError:
        """An error about attention rule ``index``, located at it when it was written in a .sdsl file."""
        rule = self.attention[index]
        return SdslSemanticError(f'attention rule "{rule.pattern}" {message}', self.attention_spans[index], self.source)


def _rules_from_source(
    rules, model_name: str | None, target: str, backend: str, cache_dir
) -> tuple[Program, RuleSet]:
    if not isinstance(rules, str | os.PathLike):
        raise SdslSemanticError(
            f"compile_model takes its rules as a .sdsl path or source, or a dict {DICT_FORMS}; "
            f"got {type(rules).__name__}"
        )
    program = compile(rules, target, backend, cache_dir=cache_dir)
    models = program.checked.models
    if not models:
        raise SdslSemanticError("the rules file has no 'model' block", source=program.checked.source)
    if model_name is not None and model_name not in models:
        raise SdslSemanticError(
            f"no model '{model_name}' in the rules (models: {', '.join(models)})", source=program.checked.source
        )
    decl: ast.ModelDecl = models[model_name] if model_name else next(iter(models.values()))
    spans = [r.span for r in decl.rules]
    attention = attention_rules_of(program, decl)
    return program, RuleSet(
        rules_of(program, decl), spans, program.checked.source, attention, [r.span for r in decl.attention]
    )


def _rules_from_dict(rules: dict, program: Program) -> RuleSet:
    """Rules written as a dict, each checked as the checker checks a ``model`` block."""
    out, attention = [], []
    for pattern, spec in rules.items():
        if isinstance(spec, dict) and isinstance(pattern, str) and "attention" in spec:
            attention.append(_attention_from_dict(pattern, spec, program))
            continue
        fmt, sparsity, method, dtype, activations = _spec_fields(spec)
        if not isinstance(pattern, str) or not isinstance(fmt, str):
            raise SdslSemanticError(f"rule {pattern!r}: {spec!r} is not a rule; the rules are a dict {DICT_FORMS}")
        if sparsity is not None and (
            isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1
        ):
            raise SdslSemanticError(f'rule "{pattern}": sparsity must be None or a number in [0, 1), got {sparsity!r}')
        if method is not None and method not in PRUNE_METHODS:
            raise SdslSemanticError(
                f'rule "{pattern}": unknown pruning method {method!r} (known: {", ".join(PRUNE_METHODS)})'
            )
        if dtype is not None and dtype not in QUANTIZED_DTYPES:
            known = ", ".join(QUANTIZED_DTYPES)
            raise SdslSemanticError(f'rule "{pattern}": dtype must be one of {known}, got {dtype!r}')
        if activations not in ACTIVATION_SCALES:
            known = ", ".join(repr(a) for a in ACTIVATION_SCALES)
            raise SdslSemanticError(f'rule "{pattern}": "activations" must be one of {known}, got {activations!r}')
        if activations != "dynamic" and dtype != "int8":
            raise SdslSemanticError(
                f'rule "{pattern}": "activations": {activations!r} scales the inputs of an int8 layer, '
                f'give "dtype": "int8" (this rule\'s dtype is {dtype!r})'
            )
        _matrix_format(program, fmt, f'rule "{pattern}"', "a linear weight is 2-d")
        sparsity = None if sparsity is None else float(sparsity)
        out.append(Rule(pattern, fmt, sparsity, prune=method, dtype=dtype, activations=activations))
    return RuleSet(out, [None] * len(out), attention=attention, attention_spans=[None] * len(attention))


def _attention_from_dict(pattern: str, spec: dict, program: Program) -> AttentionRule:
    """An attention rule written as ``{"attention": True}`` or ``{"attention": format, "window": n}``."""
    fmt, window = spec["attention"], spec.get("window")
    refuse = lambda why: SdslSemanticError(f'attention rule "{pattern}": {why}')  # noqa: E731
    if not set(spec) <= set(ATTENTION_KEYS) or not (fmt is True or isinstance(fmt, str)):
        raise refuse(
            f'{spec!r} is not an attention rule: {{"attention": True}} or {{"attention": format, "window": n}}'
        )
    if fmt is True:
        if window is not None:
            raise refuse('a window applies to a block pattern: give its format, {"attention": "BSR(64, 64)", ...}')
        return AttentionRule(pattern)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise refuse(f'a block pattern needs "window": the tokens a query reaches, an integer >= 0, got {window!r}')
    why = "but an attention block pattern is [tokens, keys]"
    form = _matrix_format(program, fmt, f'attention rule "{pattern}"', why)
    return AttentionRule(pattern, form.label, window)


def _matrix_format(program: Program, fmt: str, rule: str, why: str) -> Format:
    """Format ``fmt`` of a dict rule, which must store 2-d tensors (``why``); errors name ``rule``."""
    try:
        form = program.format(fmt)
    except SdslError as err:
        raise type(err)(f"{rule}: {err.message}") from None
    if form.rank != 2:
        raise SdslSemanticError(f"{rule}: format {fmt} stores {form.rank}-d tensors, {why}")
    return form


def _spec_fields(spec) -> tuple:
    """(format, sparsity, method, dtype, activations) of a dict rule's value; a format of None if it
    has none of the forms."""
    if isinstance(spec, str):
        return spec, None, None, None, "dynamic"
    if isinstance(spec, tuple | list) and len(spec) == 2:
        return spec[0], spec[1], None, None, "dynamic"
    if isinstance(spec, dict) and set(spec) <= set(SPEC_KEYS):
        fields = (spec.get(key) for key in SPEC_KEYS[:-1])
        return *fields, spec.get("activations", "dynamic")
    return None, None, None, None, "dynamic"


def compile_model(
    model: nn.Module,
    rules,
    target: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    aot: str | os.PathLike | None = None,
    verbose: bool = False,
    model_name: str | None = None,
    keep_dense_above: float = MAX_SPARSE_DENSITY,
    backend: str = "tvm",
    calibration=None,
) -> nn.Module:
    """A copy of ``model`` whose matching ``nn.Linear`` layers are ``SparseLinear``.

    ``backend`` is ``"tvm"`` or ``"llvm"``; ``aot`` a directory from ``sparsedsl build`` (then
    ``rules`` is ignored: the build's rules apply and nothing compiles).
    ``rules`` is a .sdsl path or source with a ``model`` block, or a dict ``{glob: format}`` /
    ``{glob: (format, sparsity)}`` or ``{glob: {"format": ..., "sparsity": ..., "prune": method}}``.
    A rule that matches no ``nn.Linear`` is an error naming it and what its glob matches. Layers
    whose rule names a pruning method, or a sparsity (then by magnitude), are pruned (``sd.prune``);
    others are packed as they are (a weight that does not fit is an error naming the layer).
    ``calibration``, an iterable of model inputs (a dict is passed as ``model(**batch)``, a tuple or
    list positionally, anything else as the one argument), is required by the methods that prune
    from the layers' inputs (``wanda``, ``sparsegpt``): those layers are pruned in forward order,
    each from the inputs it sees once the layers before it are pruned, one pass over the batches
    per block of layers (runtime/calibrate.py). A layer whose density stays above
    ``keep_dense_above`` is kept dense. ``sd.report(model)`` tells what happened to each layer.
    """
    if aot is not None:
        from sparsedsl.runtime.aot import load

        program = load(aot)
        rules, attention = program.rules, program.attention_rules
        rule_set = RuleSet(rules, [None] * len(rules), attention=attention, attention_spans=[None] * len(attention))
    elif isinstance(rules, dict):
        program = None
        rule_set = _rules_from_dict(rules, ops.nn_program(None, target, backend))
    else:
        program, rule_set = _rules_from_source(rules, model_name, target, backend, cache_dir)
    nn_prog = ops.nn_program(program, target, backend if program is None else program.backend)
    if cache_dir is not None:
        nn_prog.cache_dir = Path(cache_dir)
    if calibration is None:
        for index, rule in enumerate(rule_set.rules):
            if _calibrated(rule):
                what = f"prunes by {rule.prune}" if _prunes_from_inputs(rule) else "scales its int8 inputs statically"
                raise rule_set.error(
                    index,
                    f"{what}, which measures the layers' inputs: pass calibration=, an iterable "
                    "of model inputs (a dict is passed as model(**batch))",
                )
    result = copy.deepcopy(model)
    layers = _layers(result, rule_set)
    rows: dict[str, LayerReport] = {}
    fused_by: dict[str, str] = {}

    def build(layer: Layer, seen: Seen | None = None) -> None:
        name, _, rule = layer
        gram = seen.gram if seen is not None else None
        if rule.dtype is not None:
            activation = _activation(program, rule)
            rows[name] = _compile_quantized(result, layer, nn_prog, gram, keep_dense_above, fused_by, activation, seen)
        else:
            owner = program if rule.kernel else nn_prog
            rows[name] = _compile_layer(result, layer, owner, gram, keep_dense_above, fused_by)

    for layer in _progress([la for la in layers if not _calibrated(la[2])], verbose, "sparsedsl: compiling layers"):
        build(layer)
    calibrated = [la for la in layers if _calibrated(la[2])]
    if calibrated:
        batches = list(calibration)
        progress = lambda items, desc: _progress(items, verbose, desc)  # noqa: E731
        calibrate(result, calibrated, batches, build, progress, _measures)
        if any(la[2].activations == "static" for la in calibrated):
            compiled = {name: result.get_submodule(name) for name, _, _ in layers if rows[name].sparse}
            for name, why in requantize.fuse(result, compiled, batches[0]).items():
                note = ", ".join(n for n in (rows[name].note, why) if n)
                rows[name] = replace(rows[name], note=note, kernel=compiled[name].kernel)
    attention = _compile_attention(result, rule_set, nn_prog)
    fused = [
        FusedReport(name, type(model.get_submodule(name)).__name__, layer, rows[layer].kernel)
        for name, layer in fused_by.items()
    ]
    report = Report((rows[name] for name, _, _ in layers), attention, fused)
    result._sparsedsl_report = report
    if verbose:
        print(report)
    return result


def _calibrated(rule: Rule) -> bool:
    """Whether ``rule``'s layers are compiled from their inputs: pruned from them, or given a
    static int8 scale."""
    return _prunes_from_inputs(rule) or rule.activations == "static"


def _measures(layer: Layer) -> Seen:
    """What calibration measures of a layer's inputs: the ``Gram`` its pruning method needs, the
    magnitudes its static int8 scale needs."""
    rule = layer[2]
    gram = Gram.empty(layer[1].in_features) if _prunes_from_inputs(rule) else None
    return Seen(gram, STATIC_QUANTILE if rule.activations == "static" else None)


def _prunes_from_inputs(rule: Rule) -> bool:
    return rule.prune is not None and needs_inputs(rule.prune)


def _activation(program: Program | None, rule: Rule) -> str | None:
    """The function a quantized layer's kernel applies (that of the rule's kernel), when it fuses one."""
    return quantized_activation(program.kernels[rule.kernel].kernel) if rule.fuse and program is not None else None


def _compile_layer(
    model: nn.Module,
    layer: Layer,
    program: Program,
    gram: Gram | None,
    keep_dense_above: float,
    fused_by: dict[str, str],
) -> LayerReport:
    """Prune and pack one layer (from the ``Gram`` of its inputs for a calibrated method), put it in
    ``model`` unless its density keeps it dense, and say what was done."""
    name, linear, rule = layer
    # a row-wise kernel (residual and norm) runs in the parent's place; the layer keeps a plain one
    norm = rule.kernel is not None and program.kernels[rule.kernel].kernel.rowwise
    layer_program, layer_kernel = (ops.nn_program(program), None) if norm else (program, rule.kernel)
    try:
        sparse = SparseLinear.from_linear(
            linear, rule.format, rule.sparsity, layer_program, layer_kernel, method=rule.prune, inputs=gram
        )
        _check_fits(sparse)
    except SdslError as err:
        raise type(err)(f"layer '{name}': {err.message}") from None
    kernel = rule.kernel if norm else sparse.kernel
    if sparse.density > keep_dense_above:
        note = f"kept dense: density {sparse.density:.2f} > {keep_dense_above}"
        return LayerReport(name, rule.format, sparse.density, kernel, False, note)
    # compile now, for the layer's format and index types (its structure is the packer's: no re-validation)
    fmt = sparse.program.format(sparse.format)
    (program if norm else sparse.program).kernels[kernel].instance(fmt, index_types(sparse))
    _replace(model, name, sparse)
    if norm:
        note = f"fuses {_fuse_norm(model, name, rule.fuse, program, kernel, fused_by)} + residual"
    else:
        note = f"fuses {_fuse(model, name, rule.fuse, sparse, fused_by)}" if rule.fuse else ""
    return LayerReport(name, rule.format, sparse.density, kernel, True, note)


def _compile_quantized(
    model: nn.Module,
    layer: Layer,
    program: Program,
    gram: Gram | None,
    keep_dense_above: float,
    fused_by: dict[str, str],
    activation: str | None,
    seen: Seen | None,
) -> LayerReport:
    """``_compile_layer`` for a rule with a ``dtype``: a ``QuantizedSparseLinear``, its static
    input scale from the inputs ``seen`` (``activations`` "static"), its kernel applying
    ``activation`` in place of the module its ``fuse`` names."""
    name, linear, rule = layer
    scale = static_scale(seen.magnitude) if rule.activations == "static" else None
    try:
        quantized = QuantizedSparseLinear.from_linear(
            linear, rule.format, rule.dtype, rule.sparsity, program, rule.prune, gram, activation, scale
        )
    except SdslError as err:
        raise type(err)(f"layer '{name}': {err.message}") from None
    notes = [f"int8 static inputs, scale {scale:.3g}"] if scale is not None else []
    row = LayerReport(name, rule.format, quantized.density, quantized.kernel, True, ", ".join(notes), rule.dtype)
    if quantized.density > keep_dense_above:
        return replace(row, sparse=False, note=f"kept dense: density {quantized.density:.2f} > {keep_dense_above}")
    quantized.program.kernels[quantized.kernel].instance(
        quantized.program.format(quantized.format), index_types(quantized)
    )
    _replace(model, name, quantized)
    if rule.fuse:
        notes.append(f"fuses {_fuse(model, name, rule.fuse, quantized, fused_by)}")
    return replace(row, note=", ".join(notes))


def _layers(model: nn.Module, rule_set: RuleSet) -> list[tuple[str, nn.Linear, Rule]]:
    """Each ``nn.Linear`` of ``model`` with the first rule matching its name. A rule that matches
    none is an error saying what its glob does match: asking for sparsity never yields a dense
    model silently."""
    if not rule_set.rules and not rule_set.attention:
        raise SdslSemanticError("there are no rules: no layer would be made sparse", source=rule_set.source)
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) or _is_conv1d(mod)]
    out = []
    for name, module in linears:
        rule = next((r for r in rule_set.rules if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is not None:
            linear = _as_linear(module) if _is_conv1d(module) else module
            if linear is not module:
                _replace(model, name, linear)
            out.append((name, linear, rule))
    used = {id(rule) for _, _, rule in out}
    for index, rule in enumerate(rule_set.rules):
        if id(rule) not in used:
            raise rule_set.error(index, _why_unmatched(model, rule, rule_set.rules[:index], [n for n, _ in linears]))
    return out


def _compile_attention(model: nn.Module, rule_set: RuleSet, program: Program) -> list[AttentionReport]:
    """Run each attention module that an attention rule matches (the first rule matching its name)
    by the attention kernels of ``program`` (nn.sdsl's), the others by SDPA; their report. A rule
    that matches no attention module, or a block pattern for a causal one, is an error."""
    if not rule_set.attention:
        return []
    problem = attention_target_problem(program.target)
    if problem:
        raise rule_set.attention_error(0, problem)
    modules = [(n, m) for n, m in model.named_modules() if is_attention_module(m)]
    plans: dict[str, Plan] = {}
    patterns: dict[int, Plan] = {}  # per rule, one plan (a pattern's masks) for its modules
    rule_of: dict[str, int] = {}
    rows = []
    for name, module in modules:
        index = next((i for i, r in enumerate(rule_set.attention) if fnmatch.fnmatchcase(name, r.pattern)), None)
        if index is None:
            continue
        rule_of[name] = index
        if rule_set.attention[index].format and module.is_causal:
            raise rule_set.attention_error(
                index,
                f"has a block pattern, but '{name}' is causal: the block attention kernel cannot mask the keys after "
                "each query (a rule without a pattern runs a decoder's decoding steps, and its causal calls by SDPA)",
            )
        if index not in patterns:
            patterns[index] = _pattern(rule_set, index, program) if rule_set.attention[index].format else Dense(program)
        plans[name] = patterns[index]
        rows.append(_attention_row(name, module, plans[name]))
    for index in range(len(rule_set.attention)):
        if index not in patterns:
            names = _names([n for n, _ in modules]) if modules else "the model has none"
            raise rule_set.attention_error(
                index,
                "matches no attention module (transformers' modules that call its AttentionInterface, matched by "
                f"their dotted names whole: {names})",
            )
    refused = select(model, plans)
    if refused is not None:
        name, why = refused
        raise rule_set.attention_error(rule_of[name], f"cannot be applied: {why}")
    return rows


def _pattern(rule_set: RuleSet, index: int, program: Program) -> BlockPattern:
    """The block pattern of attention rule ``index``, its kernel of ``program`` built now (a format
    the kernel cannot read is an error at the rule)."""
    rule = rule_set.attention[index]
    try:
        pattern = BlockPattern(rule.format, rule.window, program)
        tokens, keys = pattern.multiples
        q = torch.zeros(1, 1, tokens, 1)
        pattern.attend(q, q.new_zeros(1, 1, keys, 1), q.new_zeros(1, 1, keys, 1), None, 1.0)
    except SdslError as err:
        raise rule_set.attention_error(index, f"with {rule.format}: {err.message}") from None
    return pattern


def _attention_row(name: str, module: nn.Module, plan: Plan) -> AttentionReport:
    note = "SDPA for calls of more than one query (causal)" if module.is_causal else ""
    if not isinstance(plan, BlockPattern):
        return AttentionReport(name, DENSE, str(plan), 1.0, None, note)
    tokens = getattr(module.config, "max_position_embeddings", None) or REPORT_TOKENS
    return AttentionReport(name, MASKED, str(plan), plan.density(tokens), tokens, note)


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layers: ``x @ weight + bias``,
    the weight stored ``[in, out]``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _as_linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what a ``Conv1D`` computes (its weight transposed)."""
    inputs, outputs = conv.weight.shape
    linear = nn.Linear(inputs, outputs, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _why_unmatched(model: nn.Module, rule: Rule, earlier: list[Rule], linears: list[str]) -> str:
    """Why a rule compiles no layer: what its glob matches, or which names exist."""
    taken = [n for n in linears if fnmatch.fnmatchcase(n, rule.pattern)]
    if taken:
        first = next(r for r in earlier if any(fnmatch.fnmatchcase(n, r.pattern) for n in taken))
        verb = "matches" if len(taken) == 1 else "match"
        return f'matches no layer left: {_names(taken)} {verb} the earlier rule "{first.pattern}" first'
    matched: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if name and fnmatch.fnmatchcase(name, rule.pattern):
            matched.setdefault(type(mod).__name__, []).append(name)
    if matched:
        kinds = "; ".join(f"{len(names)} {kind} ({_names(names)})" for kind, names in matched.items())
        return (
            "matches no nn.Linear layer, only nn.Linear (and transformers' Conv1D) layers are made sparse; "
            f"the modules it matches: {kinds}"
        )
    present = f"the nn.Linear layers are {_names(linears)}" if linears else "the model has no nn.Linear layer"
    return f"matches no module name (names are dotted paths, matched whole: {present})"


def _names(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def _check_fits(layer: SparseLinear) -> None:
    """Refuse a kernel that cannot take this layer (else its first call fails, naming no layer):
    tensors of another dtype, or a square weight when the layer's is not."""
    kernel = layer.program.kernels[layer.kernel].kernel
    dtype = layer.values.dtype
    wrong = [p for p in kernel.inputs if p.shape is not None and TORCH_DTYPES[p.dtype] != dtype]
    if wrong:
        takes = ", ".join(f"{p.name}: {p.dtype}" for p in wrong)
        weight = str(dtype).removeprefix("torch.")
        raise ArgumentError(f"its weight is {weight}, but kernel '{layer.kernel}' takes {takes}")
    n, k = kernel.sparse_input.shape
    if n == k and layer.out_features != layer.in_features:
        raise ArgumentError(
            f"kernel '{layer.kernel}' takes a square weight [{n}, {k}], but this layer's is "
            f"{layer.out_features} x {layer.in_features}"
        )


def _fuse(
    model: nn.Module,
    layer: str,
    pattern: str,
    sparse: SparseLinear | QuantizedSparseLinear,
    fused_by: dict[str, str],
) -> str:
    """Replace by ``nn.Identity`` the one module next to ``layer`` (a child of its parent) that
    matches ``pattern``: the kernel's epilogue computes it, and the layer keeps it for ``to_dense``.
    ``fused_by`` maps the modules fused so far to their layer."""

    refuse = _refusal(layer, pattern)
    name = _next_to(model, layer, pattern, fused_by)
    fused = model.get_submodule(name)
    if any(True for _ in fused.parameters()):
        raise refuse(f"matches '{name}', which holds parameters: only an activation the kernel computes can be fused")
    sparse.fused = fused
    if sparse.program.target == "cpu" and not _computes_fused(sparse):
        raise refuse(
            f"matches '{name}' ({type(fused).__name__}), but kernel '{sparse.kernel}' computes something else: "
            "the layer and the module it replaces give other numbers"
        )
    _replace(model, name, nn.Identity())
    fused_by[name] = layer
    return name


def _refusal(layer: str, pattern: str):
    return lambda why: SdslSemanticError(f"layer '{layer}': fuse \"{pattern}\" {why}")


def _next_to(model: nn.Module, layer: str, pattern: str, fused_by: dict[str, str]) -> str:
    """The one module next to ``layer`` (a child of its parent) that matches ``pattern``, not fused yet."""
    refuse = _refusal(layer, pattern)
    parent = layer.rpartition(".")[0]
    names = [
        n
        for n, _ in model.named_modules()
        if n not in (layer, "") and n.rpartition(".")[0] == parent and fnmatch.fnmatchcase(n, pattern)
    ]
    if len(names) != 1:
        raise refuse(f"must match one module next to it, found {', '.join(names) or 'none'}")
    if names[0] in fused_by:
        raise refuse(f"matches '{names[0]}', fused by layer '{fused_by[names[0]]}' already")
    return names[0]


def _fuse_norm(model: nn.Module, layer: str, pattern: str, program: Program, kernel: str, fused_by) -> str:
    """Replace ``layer``'s parent by a ``ResidualNorm`` running ``kernel``, the norm next to the
    layer matching ``pattern`` (runtime/fused.py); the norm's name."""
    name = _next_to(model, layer, pattern, fused_by)
    parent = layer.rpartition(".")[0]
    child = lambda n: n.rpartition(".")[2]  # noqa: E731
    fused = fuse_residual_norm(model.get_submodule(parent), child(layer), child(name), program, kernel)
    if isinstance(fused, str):
        raise _refusal(layer, pattern)(f"matches '{name}', which {fused}")
    _replace(model, parent, fused)
    fused_by[name] = layer
    return name


def _computes_fused(layer: SparseLinear | QuantizedSparseLinear) -> bool:
    """Whether the layer, its kernel's epilogue included, matches its dense twin followed by the
    fused module on a random input (a relu kernel fusing a GELU module does not); a quantized
    layer, the same layer without its activation followed by the module."""
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if isinstance(layer, QuantizedSparseLinear):
            plain = copy.copy(layer)  # shares the tensors, not the activation
            plain.activation = None
            got, want = layer(x), layer.fused(plain(x))
        else:
            x = x.to(layer.values.dtype)
            got, want = layer(x), layer.to_dense()(x)
    return torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def _progress(items, verbose: bool, desc: str):
    if not verbose:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def report(model: nn.Module) -> Report:
    """The report of a model returned by ``compile_model``: a ``Report`` (a list of
    ``LayerReport``, with the attention modules and fused modules) whose ``str`` is the tables."""
    stored = getattr(model, "_sparsedsl_report", Report())
    return Report(stored, getattr(stored, "attention", ()), getattr(stored, "fused", ()))


def format_report(rows: list[LayerReport]) -> str:
    """The report as tables: the layers, then (if any) the attention modules and the fused modules."""
    head = f"{'layer':<48} {'format':<12} {'density':>7}  {'dtype':<5} {'kernel':<18} {'runs'}"
    lines = [head, "-" * len(head)]
    for r in rows:
        runs = ("sparse" + (f", {r.note}" if r.note else "")) if r.sparse else r.note
        lines.append(f"{r.layer:<48} {r.format:<12} {r.density:>7.3f}  {r.dtype:<5} {r.kernel:<18} {runs}")
    attention = getattr(rows, "attention", [])
    if attention:
        head = f"{'attention':<48} {'pattern':<24} {'density':>7}  {'kernel':<18} {'notes'}"
        lines += ["", head, "-" * len(head)]
        for a in attention:
            notes = ", ".join(([f"density at {a.tokens} tokens"] if a.tokens else []) + ([a.note] if a.note else []))
            lines.append(f"{a.module:<48} {a.pattern:<24} {a.density:>7.3f}  {a.kernel:<18} {notes}".rstrip())
    fused = getattr(rows, "fused", [])
    if fused:
        head = f"{'fused module':<48} {'kind':<24} {'into layer':<48} {'kernel'}"
        lines += ["", head, "-" * len(head)]
        lines += [f"{f.module:<48} {f.kind:<24} {f.layer:<48} {f.kernel}" for f in fused]
    return "\n".join(lines)


def prune_to(
    weight: torch.Tensor,
    format: str | Format,
    sparsity: float | None = None,
    program: Program | None = None,
    *,
    method: str = "magnitude",
    inputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sd.prune``: a copy of ``weight`` pruned by ``method`` (``magnitude``, ``wanda`` or
    ``sparsegpt``; the last two need ``inputs``, a ``[tokens, K]`` sample of the layer's inputs) so
    that it fits ``format`` (a ``Format``, or its text: a prelude format, or one of ``program``)."""
    from sparsedsl.runtime.prune import prune

    if not isinstance(format, Format):
        program = program if program is not None else ops.nn_program()
        format = program.format(format)
    return prune(weight, format, sparsity, method=method, inputs=inputs)
