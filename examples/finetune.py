"""Sparse fine-tuning: prune a small model to 2:4 and 4x1 blocks, then train only the stored
values. The loss falls and the sparsity pattern never changes.

    python examples/finetune.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sparsedsl as sd  # noqa: I001


def make_task(n: int = 2048, dim: int = 64, seed: int = 0):
    """A synthetic regression task a small MLP can learn."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    teacher = nn.Sequential(nn.Linear(dim, 128), nn.Tanh(), nn.Linear(128, 8))
    with torch.no_grad():
        y = teacher(x)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = make_task()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    sparse = sd.compile_model(model, {"0": ("NM(2, 4)", 0.5), "2": ("BSR(4, 1)", 0.8)})
    for row in sd.report(sparse):
        print(f"layer {row.layer}: {row.format}, density {row.density:.2f}")
    patterns = {
        name: [b.clone() for b in m.structure()] for name, m in sparse.named_modules() if isinstance(m, sd.SparseLinear)
    }
    optimizer = torch.optim.Adam(sparse.parameters(), lr=3e-3)
    for step in range(args.steps + 1):
        batch = torch.randint(0, x.shape[0], (128,))
        loss = nn.functional.mse_loss(sparse(x[batch]), y[batch])
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
        if step == args.steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unchanged = all(
        torch.equal(a, b)
        for name, m in sparse.named_modules()
        if isinstance(m, sd.SparseLinear)
        for a, b in zip(patterns[name], m.structure())
    )
    print(f"sparsity pattern unchanged: {unchanged}")


if __name__ == "__main__":
    main()
