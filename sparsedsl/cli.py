"""The ``sparsedsl`` command: ``check``, ``emit`` and ``build``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sparsedsl.errors import SdslError
from sparsedsl.frontend.check import check
from sparsedsl.runtime.program import Program, read_source

EXIT_SIGPIPE = 141  # 128 + SIGPIPE: the status of a Unix tool whose reader went away
STAGES = ("ir", "tir", "llvm", "asm", "cuda")


def _check(args) -> int:
    checked = check(read_source(Path(args.file)))
    targets = {"cpu"} | {target for _, target in checked.schedules}  # a cuda schedule is checked on cuda
    for target in sorted(targets):
        program = Program(checked, target=target)
        for kernel in program.kernels.values():
            fmt = kernel._default_format()
            if fmt is not None or kernel.kernel.sparse_input is None:
                kernel.lowered(fmt)  # what only lowering can tell: schedules, kernel structure
    kernels = ", ".join(program.kernels) or "none"
    print(f"{args.file}: ok ({len(program.kernels)} kernels: {kernels})")
    return 0


def _emit(args) -> int:
    target = "cuda" if args.stage == "cuda" else args.target
    program = Program(check(read_source(Path(args.file))), target=target, backend=args.backend, arch=args.arch)
    if args.kernel not in program.kernels:
        known = ", ".join(program.kernels) or "none"
        raise SdslError(f"no kernel '{args.kernel}' in {args.file} (kernels: {known})")
    fmt = program.format(args.format) if args.format else None
    print(program.kernels[args.kernel].source(args.stage, fmt))
    return 0


def _build(args) -> int:
    from sparsedsl.runtime.aot import build

    out = build(Path(args.file), args.output, args.target, args.backend, args.arch)
    print(f"built {args.file} into {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 diagnostics)."""
    parser = argparse.ArgumentParser(prog="sparsedsl", description="compiler for sparse deep-learning kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="parse and check a .sdsl file")
    p.add_argument("file")
    p.set_defaults(run=_check)
    p = sub.add_parser("emit", help="print the generated code of a kernel")
    p.add_argument("file")
    p.add_argument("--kernel", required=True)
    p.add_argument("--stage", choices=STAGES, default="tir")
    p.add_argument("--format", help="format of the sparse input, e.g. 'NM(2, 4)' (default: the kernel's)")
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("tvm", "llvm"), default="tvm")
    p.add_argument("--arch", help="CUDA architecture, e.g. sm_90 (default: the visible GPU's, else sm_80)")
    p.set_defaults(run=_emit)
    p = sub.add_parser("build", help="compile every kernel ahead of time into a directory")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("tvm", "llvm"), default="tvm")
    p.add_argument("--arch", help="CUDA architecture, e.g. sm_90 (default: the visible GPU's, else sm_80)")
    p.set_defaults(run=_build)
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe is reported here, not at exit
        return status
    except SdslError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`| head -1`): stop quietly, as Unix tools do, with SIGPIPE's status.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return EXIT_SIGPIPE
    except OSError as err:  # writing the build directory: the file system's refusal, in one line
        where = err.filename if err.filename is not None else "sparsedsl"
        print(f"{where}: error: {err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
