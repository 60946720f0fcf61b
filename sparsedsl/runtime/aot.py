"""Ahead-of-time builds: ``sparsedsl build FILE -o DIR`` and ``sd.load(DIR)``.

A build directory holds the source, one shared library per (kernel, format, index buffer types)
and a ``manifest.json`` recording what was built and for what: the schema version, the versions of
sparsedsl / TVM / torch, the target with its CPU and the instruction-set extensions its code may use
(``avx2``, ``fma``, ``avx512f``...), the source's SHA-256, each kernel's signature and
each artifact's SHA-256. A build does not know the shapes of the weights it will meet, and a
level's coordinate type follows its extent (``Format.index_dtypes``), so each format is built for
every combination of index types its tensors can have (``Format.index_dtype_choices``: one for
N:M, three for CSR, nine for COO). The kernels of sparsedsl/nn.sdsl that the model rules run (the
quantized layers', the attention rules') are built beside the file's. Loading checks all of it
and never compiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from sparsedsl import cache
from sparsedsl.backends.cuda.module import CudaModule, default_arch
from sparsedsl.config import cache_dir as default_cache_dir
from sparsedsl.errors import BackendError, SdslError, SdslSemanticError, Source
from sparsedsl.frontend.check import check, quantized_activation
from sparsedsl.ir import levels as lv
from sparsedsl.ir.formats import Format
from sparsedsl.runtime import ops, tuning
from sparsedsl.runtime.attention import kernels_for
from sparsedsl.runtime.program import Instance, Program, index_type_choices, read_source
from sparsedsl.runtime.quantized import quantized_kernel
from sparsedsl.runtime.rules import AttentionRule, Rule, attention_rules_of, attention_target_problem, rules_of
from sparsedsl.version import __version__

SCHEMA_VERSION = 4  # 2: the target lists the CPU features the code needs; 3: each kernel its index types;
# 4: the attention rules, with their kernels
CPU_ONLY = ("cpu", "features")  # where a CPU build loads, its CPU may differ; its features are checked
MANIFEST = "manifest.json"
SOURCE = "source.sdsl"


class AotError(SdslError):
    """An ahead-of-time build that cannot be loaded here (mismatch or damage)."""


def _versions(backend: str, target: str = "cpu") -> dict[str, str]:
    """What a build must be loaded with: a CUDA build (a cubin and launch data) needs only sparsedsl."""
    if target == "cuda":
        return {"sparsedsl": __version__}
    versions = {"sparsedsl": __version__, "torch": torch.__version__}
    if backend == "tvm":
        import tvm

        versions["tvm"] = tvm.__version__
    else:
        import llvmlite

        versions["llvmlite"] = llvmlite.__version__
    return versions


def _target(program: Program) -> dict:
    """What the program's code is built for here: a GPU architecture, or a CPU's name and the
    instruction-set extensions its code may use."""
    if program.target == "cuda":
        return {"kind": "cuda", "backend": "tvm", "arch": program.arch or default_arch()}
    if program.backend == "tvm":
        from sparsedsl.backends.tvm.cpu import code_features, host_cpu
    else:
        from sparsedsl.backends.llvm.jit import code_features, host_cpu
    return {
        "kind": program.target,
        "backend": program.backend,
        "mtriple": "x86_64-unknown-linux-gnu",
        "cpu": host_cpu(),
        "features": code_features(),
    }


def _check_target(root: Path, built: dict, here: dict) -> None:
    """A CPU build loads on any CPU that has every extension its code may use: the name of the CPU
    it was built on only tuned the code. Any other difference of target is a mismatch."""
    if {k: v for k, v in built.items() if k not in CPU_ONLY} != {k: v for k, v in here.items() if k not in CPU_ONLY}:
        raise AotError(f"{root} was built for {built}, this machine is {here}: rebuild it here")
    if here["kind"] == "cuda":
        return
    features = built.get("features")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise AotError(f"{root / MANIFEST} does not list the CPU features its code needs: rebuild it")
    from sparsedsl.backends import host

    missing = sorted(set(features) - host.present())
    if missing:
        raise AotError(
            f"{root} was built for a CPU with {', '.join(missing)}, which this one ({here['cpu']}) lacks: "
            "rebuild it here"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _formats_to_build(program: Program) -> dict[str, list[Format | None]]:
    """Per kernel: its own format and every format a model rule pairs it with."""
    out: dict[str, list[Format | None]] = {}
    for name, kernel in program.kernels.items():
        own = kernel._default_format()
        formats = [own] if own is not None or kernel.kernel.sparse_input is None else []
        for model in program.checked.models.values():
            for rule in model.rules:
                if rule.kernel.text == name and rule.format is not None:
                    formats.append(program.checked.format(rule.format))
        out[name] = formats
    return out


def _quantized_to_build(program: Program) -> dict[str, list[Format | None]]:
    """Per kernel of nn.sdsl: the formats of the model rules whose layers it runs (rules with a
    ``dtype``, their fused activation), and the activations' quantization (dense) when a layer is
    int8; where a model has static int8 rules, its int8 layers' kernels that write the next
    layer's int8 input too (runtime/requantize.py decides when the model is compiled); where a
    rule fuses an activation, the kernel without it too (compile_model checks the fusion by it)."""
    out: dict[str, list[Format | None]] = {}
    for model in program.checked.models.values():
        static = any(r.activations is not None and r.activations.text == "static" for r in model.rules)
        for rule in model.rules:
            if rule.dtype is not None:
                kernel = program.kernels[rule.kernel.text]
                fmt = program.checked.format(rule.format) if rule.format is not None else kernel._default_format()
                activation = quantized_activation(kernel.kernel) if rule.fuse else None
                names = [
                    quantized_kernel(rule.dtype.text, activation, emits)
                    for emits in ((False, True) if static and rule.dtype.text == "int8" else (False,))
                ]
                for name in names + ([quantized_kernel(rule.dtype.text)] if activation else []):
                    out.setdefault(name, []).append(fmt)
                if rule.dtype.text == "int8":
                    out["quantize_rows"] = [None]
    return out


def _attention_to_build(program: Program, nn: Program) -> dict[str, list[Format | None]]:
    """Per attention kernel of nn.sdsl: what the attention rules reach when called
    (runtime/attention.py's ``_attend``): a rule without a block pattern the dense kernels, one
    with a pattern the block kernels for its format, each on [B, T, H, D] storage read in place
    (what transformers hands over) and on [B * H, T, D] copies (any other layout). A rule for
    another target than the CPU, or a format the block kernels cannot read, is an error at it."""
    out: dict[str, list[Format | None]] = {}
    source = program.checked.source
    problem = attention_target_problem(program.target)
    for model in program.checked.models.values():
        for rule in model.attention:
            if problem:
                raise SdslSemanticError(f'attention rule "{rule.pattern}" {problem}', rule.span, source)
            fmt = program.checked.format(rule.format) if rule.format else None
            for name in kernels_for(fmt is not None):
                try:  # lowered here, where an error is the rule's; the build below compiles them
                    for index_dtypes in index_type_choices(fmt) if fmt is not None else ():
                        nn.kernels[name].instance(fmt, index_dtypes)
                except SdslError as err:
                    if isinstance(err, BackendError):  # the compiler's failure, not the rule's
                        raise
                    raise SdslSemanticError(
                        f'attention rule "{rule.pattern}" with {fmt.label}: {err.message}', rule.span, source
                    ) from None
                out.setdefault(name, []).append(fmt)
    return out


def build(
    path_or_source, out_dir: str | os.PathLike, target: str = "cpu", backend: str = "tvm", arch: str | None = None
) -> Path:
    """Compile every kernel of a .sdsl file for its formats and write them with a manifest."""
    source = read_source(path_or_source)
    program = Program(check(source), target, backend, arch=arch)
    program.cache_dir = None
    nn = ops.nn_program(program)  # the quantized layers' and attention's kernels, knowing the file's formats
    nn.cache_dir = None
    nn_todo = _quantized_to_build(program) | _attention_to_build(program, nn)  # no kernel in both
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SOURCE).write_text(source.text)
    kernels = []
    sources = (("file", program, _formats_to_build(program)), ("nn", nn, nn_todo))
    for origin, owner, todo in sources:
        for name, formats in todo.items():
            compiled = owner.kernels[name]
            for fmt in dict.fromkeys(formats):  # rules may repeat a format
                for index_dtypes in index_type_choices(fmt):
                    inst = compiled.instance(fmt, index_dtypes)
                    suffix = ".cuda.json" if target == "cuda" else ".so"
                    stem = "__".join((name, _slug(fmt.label), *index_dtypes) if fmt else (name, "dense"))
                    lib = out / f"{'nn.' if origin == 'nn' else ''}{stem}{suffix}"
                    cache.atomic_write(lib, inst.built.export)
                    kernels.append(
                        {
                            "kernel": name,
                            "program": origin,
                            "signature": compiled.signature(),
                            "format": fmt.label if fmt else None,
                            "index_dtypes": list(index_dtypes) if fmt else None,
                            "variants": list(inst.variants),
                            "file": lib.name,
                            "sha256": cache.digest(lib),
                        }
                    )
    rules = [asdict(r) for decl in program.checked.models.values() for r in rules_of(program, decl)]
    attention = [asdict(r) for decl in program.checked.models.values() for r in attention_rules_of(program, decl)]
    built = [inst for _, owner, _ in sources for kernel in owner.kernels.values() for inst in kernel.instances.values()]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "versions": _versions(backend, target),
        "target": _target(program),
        "source": {"file": SOURCE, "sha256": hashlib.sha256(source.text.encode()).hexdigest(), "name": source.filename},
        "kernels": kernels,
        "rules": rules,
        "attention": attention,
        "choices": _machine_choices({inst.code for inst in built}) if target == "cpu" else {},
    }
    cache.atomic_write(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return out


def _machine_choices(codes: set[str]) -> dict[str, str]:
    """The variant choices this machine measured for kernels of these codes (runtime/tuning.py),
    from the default kernel cache: a build carries them."""
    from sparsedsl.backends.llvm.jit import host_cpu

    directory = default_cache_dir()
    return tuning.Choices(tuning.choices_file(directory, host_cpu())).of(codes) if directory else {}


def _load_library(backend: str, lib: Path, image: bytes, funcs, target: str = "cpu"):
    """A built library as the backend's ``Built``, loaded from a private copy of ``image``, the
    bytes whose SHA-256 was checked: a file swapped in the build after the check is never loaded."""
    with tempfile.TemporaryDirectory(prefix="sparsedsl-aot-") as tmp:
        private = Path(tmp) / lib.name
        private.write_bytes(image)
        if target == "cuda":
            return CudaModule.load(private)
        if backend == "llvm":
            from sparsedsl.backends.llvm.jit import load_library

            return replace(load_library(private, funcs), library=lib)  # exported again from the build
        from sparsedsl.backends.tvm.cpu import cpu_tir, load

        return load(private, {f.name: cpu_tir(f) for f in funcs}, image)


def _read_manifest(root: Path) -> dict:
    """The manifest, its shape checked: a damaged or hand-edited one is an AotError naming what is wrong."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise AotError(f"{root} is not a sparsedsl build: no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AotError(f"{path} is damaged: {err}") from None
    if not isinstance(manifest, dict):
        raise AotError(f"{path} is damaged: not a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise AotError(f"{root}: build schema {manifest.get('schema_version')}, this sparsedsl reads {SCHEMA_VERSION}")
    source, kernels, rules = manifest.get("source"), manifest.get("kernels"), manifest.get("rules")
    attention = manifest.get("attention")
    wrong = [
        name
        for name, ok in (
            ("versions", isinstance(manifest.get("versions"), dict)),
            ("target", isinstance(manifest.get("target"), dict)),
            ("source", isinstance(source, dict) and _strings(source, "sha256", "name")),
            ("kernels", isinstance(kernels, list) and all(_kernel_entry(k) for k in kernels)),
            ("rules", isinstance(rules, list) and all(_rule_entry(r) for r in rules)),
            ("attention", isinstance(attention, list) and all(_attention_entry(a) for a in attention)),
        )
        if not ok
    ]
    if wrong:
        raise AotError(f"{path} is damaged: {', '.join(wrong)} missing or malformed")
    return manifest


def _strings(entry: dict, *keys: str) -> bool:
    return all(isinstance(entry.get(k), str) for k in keys)


def _rule_entry(entry) -> bool:
    """A rule entry: a pattern, a format and nothing ``Rule`` does not have."""
    fields = set(Rule.__dataclass_fields__)
    return isinstance(entry, dict) and _strings(entry, "pattern", "format") and set(entry) <= fields


def _attention_entry(entry) -> bool:
    """An attention rule entry: a pattern, a format and a window (both or neither), nothing else."""
    fields = set(AttentionRule.__dataclass_fields__)
    if not isinstance(entry, dict) or not _strings(entry, "pattern") or not set(entry) <= fields:
        return False
    fmt, window = entry.get("format"), entry.get("window")
    pattern = isinstance(fmt, str) and isinstance(window, int) and not isinstance(window, bool) and window >= 0
    return pattern or (fmt is None and window is None)


def _kernel_entry(entry) -> bool:
    """A kernel entry: names, a library file in the build directory itself, its variants."""
    return (
        isinstance(entry, dict)
        and _strings(entry, "kernel", "file", "sha256")
        and Path(entry["file"]).name == entry["file"]
        and isinstance(entry.get("format"), str | None)
        and _index_dtypes_entry(entry)
        and isinstance(entry.get("variants"), list)
        and entry.get("program", "file") in ("file", "nn")
    )


def _index_dtypes_entry(entry: dict) -> bool:
    """A kernel entry's index types: one known coordinate or position type per index buffer of its
    format, or none without a format."""
    types, known = entry.get("index_dtypes"), {lv.type_name(d) for d, _ in lv.COORDINATE_DTYPES}
    if entry.get("format") is None:
        return types is None
    return isinstance(types, list) and all(t in known | {lv.type_name(lv.POS_DTYPE)} for t in types)


def load(directory: str | os.PathLike) -> Program:
    """The Program of an AOT build, its kernels loaded from their libraries; nothing compiles.
    A mismatched schema, version, CPU feature or checksum, or a damaged manifest, is an AotError."""
    root = Path(directory)
    manifest = _read_manifest(root)
    target = manifest["target"]
    backend = target.get("backend", "tvm")
    for tool, version in _versions(backend, target.get("kind", "cpu")).items():
        if manifest["versions"].get(tool) != version:
            raise AotError(
                f"{root} was built with {tool} {manifest['versions'].get(tool)}, this is {version}: rebuild it"
            )
    try:
        source_text = (root / SOURCE).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise AotError(f"{root / SOURCE} cannot be read: {err}") from None
    if hashlib.sha256(source_text.encode()).hexdigest() != manifest["source"]["sha256"]:
        raise AotError(f"{root / SOURCE} does not match the manifest's hash")
    if target.get("kind") not in ("cpu", "cuda") or backend not in ("tvm", "llvm"):
        raise AotError(f"{root / MANIFEST} is damaged: no target kind {target.get('kind')!r}, backend {backend!r}")
    program = Program(
        check(Source(source_text, manifest["source"]["name"])), target["kind"], backend, arch=target.get("arch")
    )
    program.cache_dir = None
    _check_target(root, target, _target(program))
    for entry in manifest["kernels"]:
        lib = root / entry["file"]
        image = lib.read_bytes() if lib.is_file() else None
        if image is None or hashlib.sha256(image).hexdigest() != entry["sha256"]:
            raise AotError(f"{lib} is missing or does not match its SHA-256 in the manifest")
        nn = entry.get("program") == "nn"  # a quantized layer's kernel, of nn.sdsl
        compiled = (ops.nn_program(program) if nn else program).kernels.get(entry["kernel"])
        if compiled is None:
            where = "sparsedsl's nn.sdsl" if nn else SOURCE
            raise AotError(f"{root / MANIFEST} lists a kernel '{entry['kernel']}' that {where} does not define")
        fmt = program.format(entry["format"]) if entry["format"] else None
        index_dtypes = tuple(entry["index_dtypes"]) if fmt else None
        if fmt is not None and len(index_dtypes) != len(fmt.buffer_keys()):
            raise AotError(f"{lib}: {len(index_dtypes)} index types for the {len(fmt.buffer_keys())} of {fmt.label}")
        variants = compiled.lowered(fmt, index_dtypes)
        if list(variants) != entry["variants"]:
            raise AotError(f"{lib}: its variants {entry['variants']} differ from this compiler's {list(variants)}")
        funcs = list(variants.values())
        built = program.variant_builds(funcs, _load_library(backend, lib, image, funcs, program.target))
        compiled.instances[(fmt, index_dtypes)] = Instance(variants, built, backend)
    program.aot = ops.nn_program(program).aot = root  # a kernel the build lacks is an error, never compiled
    program.rules = [Rule(**r) for r in manifest["rules"]]
    program.attention_rules = [AttentionRule(**a) for a in manifest["attention"]]
    choices = manifest.get("choices", {})
    if not isinstance(choices, dict) or not all(isinstance(v, str) for v in choices.values()):
        raise AotError(f"{root / MANIFEST} is damaged: 'choices' must map keys to variant names")
    program.choices.known.update(choices)
    return program
