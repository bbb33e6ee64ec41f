"""A small demo: a character-level model trained on Python's own standard-library sources.

Compares ``torch.optim.AdamW`` with ``afx.Adafactor``, ``afx.Adafactor8Bit`` (8-bit states) and
its CAME preset (all compiled) on the same data and prints the validation loss, the
optimizer-state bytes and the time per step of each. Needs no download: the
text is read from the standard library's ``.py`` files.

Run ``python -m afx.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch

import afx


def corpus(max_chars: int = 400_000) -> str:
    """Concatenated source of the standard library's modules (sorted, so runs are repeatable)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text, size = [], 0
    for path in sorted(root.glob("*.py")):
        chunk = path.read_text(encoding="utf-8", errors="replace")
        text.append(chunk)
        size += len(chunk)
        if size >= max_chars:
            break
    return "".join(text)[:max_chars]


class CharModel(torch.nn.Module):
    """Embedding -> two-layer MLP over a window of previous characters -> next character."""

    def __init__(self, vocab: int, context: int = 16, width: int = 256) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 32)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(32 * context, width), torch.nn.GELU(),
            torch.nn.LayerNorm(width), torch.nn.Linear(width, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(x).flatten(1))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=3e-3)
    if name == "afx-adafactor":
        return afx.Adafactor(model.parameters(), lr=3e-3, relative_step=False, beta1=0.9)
    if name == "afx-adafactor8bit":
        return afx.Adafactor8Bit(model.parameters(), lr=1e-2, relative_step=False, beta1=0.9,
                                 min_8bit_size=1024)
    if name == "afx-came":
        groups = afx.build_param_groups(model, "came")
        return afx.Adafactor8Bit(groups, lr=2e-4, min_8bit_size=1024)
    raise ValueError(f"unknown optimizer {name!r}")


OPTIMIZERS = ("adamw", "afx-adafactor", "afx-adafactor8bit", "afx-came")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="afx-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma-separated subset of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    names = [n for n in args.optimizers.split(",") if n]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown or args.steps < 1:
        parser.error(f"--optimizers: unknown {unknown}" if unknown else "--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    text = corpus()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text[:200_000]], dtype=torch.long)
    split = int(0.9 * len(data))
    context, batch = 16, 64

    def sample(source: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(source) - context - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(context + 1)
        window = source[idx]
        return window[:, :-1], window[:, -1]

    print(f"corpus: {len(text):,} characters of the standard library, vocabulary {len(vocab)}")
    rows = []
    for name in names:
        torch.manual_seed(args.seed)
        model = CharModel(len(vocab), context)
        opt = make_optimizer(name, model)
        gen = torch.Generator().manual_seed(args.seed)
        times = []
        for step in range(args.steps):
            x, y = sample(data[:split], gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
            if step % max(1, args.steps // 10) == 0:
                print(f"  {name:14s} step {step:5d}  loss {loss.item():.3f}", flush=True)
        with torch.no_grad():
            vgen = torch.Generator().manual_seed(12345)
            val = sum(torch.nn.functional.cross_entropy(model(x), y).item()
                      for x, y in (sample(data[split:], vgen) for _ in range(20))) / 20
        steady = sorted(times[1:] or times)[len(times[1:] or times) // 2]
        rows.append((name, val, state_bytes(opt), 1e3 * steady, 1e3 * times[0]))

    print("\n| optimizer | validation loss | state bytes | ms/step (median) | first step ms |")
    print("|---|---:|---:|---:|---:|")
    for name, val, nbytes, ms, first in rows:
        print(f"| {name} | {val:.3f} | {nbytes:,} | {ms:.2f} | {first:.0f} |")


if __name__ == "__main__":
    main()
