"""afx demo: a tiny character-level transformer trained on Python's own standard-library sources.

Trains the same small causal transformer with ``torch.optim.AdamW``, ``afx.Adafactor``,
``afx.Adafactor8Bit`` (8-bit states) and its CAME preset (``afx.build_param_groups(model,
"came")``) on the same batches, then prints a table (validation loss, optimizer-state bytes,
time per optimizer step, training tokens per second) and saves a PNG with the loss curves and
the optimizer-state memory of each. Needs no download: the text is read from the ``.py`` files
of the running interpreter's standard library.

Run ``python -m afx.demo --help`` for the options (also installed as the ``afx-demo`` command).

Example:
    >>> from afx.demo import run
    >>> rows = run(["--steps", "2", "--optimizers", "adamw", "--d-model", "16",
    ...             "--context", "8", "--batch-size", "2", "--out", "", "--quiet"])
    ... # doctest: +ELLIPSIS
    corpus: ...
    | adamw | ...
    >>> rows[0]["optimizer"], len(rows[0]["train_loss"])
    ('adamw', 2)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

import afx

Tensor = torch.Tensor

#: Optimizers the demo can train with, in table order.
OPTIMIZERS = ("adamw", "afx-adafactor", "afx-adafactor8bit", "afx-came")
PNG_NAME = "afx_demo.png"
# Peak learning rates: the best of {1e-3, 3e-3, 1e-2} for each optimizer at the default settings.
LEARNING_RATES = {"adamw": 3e-3, "afx-adafactor": 1e-2, "afx-adafactor8bit": 3e-3,
                  "afx-came": 1e-3}
TABLE_NAME = "afx_demo.md"


# --------------------------------------------------------------------------------------- data --
def corpus(max_chars: int = 400_000) -> str:
    """Concatenated source of the standard library's top-level modules.

    Files are read in sorted order, so the text (and every run) is repeatable on one Python
    version.

    Args:
        max_chars: stop after this many characters.

    Returns:
        The text, at most ``max_chars`` characters long.

    Example:
        >>> from afx.demo import corpus
        >>> len(corpus(1000))
        1000
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    text, size = [], 0
    for path in sorted(root.glob("*.py")):
        chunk = path.read_text(encoding="utf-8", errors="replace")
        text.append(chunk)
        size += len(chunk)
        if size >= max_chars:
            break
    return "".join(text)[:max_chars]


def encode_text(text: str) -> tuple[Tensor, list[str]]:
    """Character-level tokens of ``text`` and the vocabulary (sorted characters).

    Example:
        >>> from afx.demo import encode_text
        >>> tokens, vocab = encode_text("abca")
        >>> tokens.tolist(), vocab
        ([0, 1, 2, 0], ['a', 'b', 'c'])
    """
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), vocab


def sample_batch(tokens: Tensor, batch: int, context: int,
                 gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of ``context + 1`` tokens: inputs and next-token targets.

    Example:
        >>> import torch
        >>> from afx.demo import sample_batch
        >>> x, y = sample_batch(torch.arange(100), 3, 8, torch.Generator().manual_seed(0))
        >>> x.shape, bool((y == x + 1).all())
        (torch.Size([3, 8]), True)
    """
    starts = torch.randint(0, len(tokens) - context - 1, (batch,), generator=gen)
    window = tokens[starts[:, None] + torch.arange(context + 1)]
    return window[:, :-1], window[:, 1:]


# -------------------------------------------------------------------------------------- model --
class Block(torch.nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.attn_qkv = torch.nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_out = torch.nn.Linear(d_model, d_model, bias=False)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.mlp_in = torch.nn.Linear(d_model, 4 * d_model, bias=False)
        self.mlp_out = torch.nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.attn_qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x))))


class TinyTransformer(torch.nn.Module):
    """A GPT-style causal character model: token and position embeddings, blocks, lm_head.

    Args:
        vocab: number of distinct characters.
        context: maximum sequence length.
        d_model: width of the residual stream (a multiple of ``heads``).
        layers: number of transformer blocks.
        heads: attention heads per block.

    Example:
        >>> import torch
        >>> from afx.demo import TinyTransformer
        >>> model = TinyTransformer(vocab=10, context=8, d_model=16, layers=1, heads=2)
        >>> model(torch.zeros(3, 8, dtype=torch.long)).shape
        torch.Size([3, 8, 10])
    """

    def __init__(self, vocab: int, context: int, d_model: int = 64, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.pos_embed = torch.nn.Embedding(context, d_model)
        self.blocks = torch.nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d_model)
        self.lm_head = torch.nn.Linear(d_model, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's initialisation, with the residual projections scaled by depth.
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("_out.weight") else 0.02
                torch.nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx) + self.pos_embed.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------------- optimizers --
def make_optimizer(name: str, model: torch.nn.Module, lr: float | None = None,
                   compile: bool = True) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) for ``model``, with the demo's settings.

    Args:
        name: ``"adamw"`` (``torch.optim.AdamW``), ``"afx-adafactor"`` (``afx.Adafactor`` with a
            fixed lr and momentum), ``"afx-adafactor8bit"`` (``afx.Adafactor8Bit`` with 8-bit
            momentum and second moment) or ``"afx-came"`` (``afx.Adafactor8Bit`` on the groups
            of ``afx.build_param_groups(model, "came")``).
        model: the model whose parameters are optimized.
        lr: peak learning rate (default: a value tuned for the demo's model).
        compile: compile afx's update (``False``: run the same chain eagerly).

    Returns:
        The optimizer.

    Raises:
        ValueError: for an unknown name.

    Example:
        >>> import torch
        >>> from afx.demo import make_optimizer
        >>> type(make_optimizer("adamw", torch.nn.Linear(2, 2))).__name__
        'AdamW'
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    lr = lr or LEARNING_RATES[name]
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    # Adafactor's parameter scaling (step ∝ RMS(p)) is switched off: with GPT-2's 0.02
    # initialisation it would make the steps of this short run 50x smaller than AdamW's.
    if name == "afx-adafactor":
        return afx.Adafactor(model.parameters(), lr=lr, relative_step=False,
                             scale_parameter=False, beta1=0.9, compile=compile)
    if name == "afx-adafactor8bit":
        # min_8bit_size lowered so that the demo's small matrices get 8-bit states too.
        return afx.Adafactor8Bit(model.parameters(), lr=lr, relative_step=False,
                                 scale_parameter=False, beta1=0.9, min_8bit_size=1024,
                                 compile=compile)
    groups = afx.build_param_groups(model, "came")
    return afx.Adafactor8Bit(groups, lr=lr, min_8bit_size=1024, compile=compile)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's per-parameter state.

    Example:
        >>> import torch
        >>> from afx.demo import state_bytes
        >>> p = torch.nn.Parameter(torch.zeros(10))
        >>> opt = torch.optim.AdamW([p])
        >>> p.grad = torch.ones(10)
        >>> opt.step()
        >>> state_bytes(opt)  # two float32 moments and a float32 step
        84
    """
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, Tensor))


# ------------------------------------------------------------------------------- progress bar --
class Progress:
    """A minimal progress bar on a stream (redrawn in place on a terminal, sparse lines else)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_draw = 0.0
        self.last_line = -1

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        """Shows ``done`` of ``total`` steps with a free-form ``note``."""
        if not self.enabled:
            return
        now = time.perf_counter()
        frac = done / self.total
        if self.tty:
            if not force and done < self.total and now - self.last_draw < 0.1:
                return
            width = 24
            filled = int(width * frac)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{self.label:18s} [{bar}] {done}/{self.total} {note}\x1b[K")
        else:
            # Logs (CI, pipes): a line at each quarter instead of carriage returns.
            quarter = int(4 * frac)
            if not force and quarter == self.last_line:
                return
            self.last_line = quarter
            self.stream.write(f"{self.label:18s} {done}/{self.total} {note}\n")
        self.last_draw = now
        self.stream.flush()

    def close(self, note: str = "") -> None:
        """Draws the final state and ends the line."""
        self.update(self.total, note, force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------- training --
def evaluate(model: torch.nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Mean cross-entropy of ``model`` over fixed batches (nats per character)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                   for x, y in batches) / len(batches)
    model.train(was_training)
    return loss


def lr_lambda(steps: int) -> Callable[[int], float]:
    """Linear warmup over the first 10 % of the steps, then cosine decay to 10 %."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train_one(name: str, args: argparse.Namespace, tokens: Tensor, split: int, vocab: int,
              val_batches: Sequence[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """Trains a fresh model with optimizer ``name``; returns its measurements."""
    torch.manual_seed(args.seed)
    model = TinyTransformer(vocab, args.context, args.d_model, args.layers, args.heads)
    opt = make_optimizer(name, model, args.lr, compile=not args.no_compile)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
    gen = torch.Generator().manual_seed(args.seed)
    eval_every = max(1, args.steps // 8)
    train_loss, val_curve, opt_times, step_times = [], [], [], []
    bar = Progress(name, args.steps, enabled=not args.quiet)
    compiles = name != "adamw" and not args.no_compile
    bar.update(0, "first step compiles the update..." if compiles else "", force=True)
    for step in range(args.steps):
        x, y = sample_batch(tokens[:split], args.batch_size, args.context, gen)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mid = time.perf_counter()
        opt.step()
        sched.step()
        end = time.perf_counter()
        opt_times.append(end - mid)
        step_times.append(end - start)
        train_loss.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            val_curve.append((step + 1, evaluate(model, val_batches)))
        bar.update(step + 1, f"loss {train_loss[-1]:.3f}")
    steady_opt = opt_times[1:] or opt_times
    steady_step = step_times[1:] or step_times
    step_s = statistics.median(steady_step)
    nbytes = state_bytes(opt)
    nparams = sum(p.numel() for p in model.parameters())
    bar.close(f"val loss {val_curve[-1][1]:.3f}, first step {opt_times[0]:.1f} s")
    return {
        "optimizer": name, "steps": args.steps, "val_loss": val_curve[-1][1],
        "state_bytes": nbytes, "state_bytes_per_param": nbytes / nparams,
        "opt_ms": 1e3 * statistics.median(steady_opt), "step_ms": 1e3 * step_s,
        "tokens_per_s": args.batch_size * args.context / step_s,
        "first_step_s": opt_times[0], "train_loss": train_loss, "val_curve": val_curve,
        "params": nparams,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table.

    Example:
        >>> from afx.demo import format_table
        >>> row = dict(optimizer="adamw", val_loss=2.5, state_bytes=800, state_bytes_per_param=8.0,
        ...            opt_ms=1.0, step_ms=10.0, tokens_per_s=2048.0, first_step_s=0.01)
        >>> print(format_table([row]).splitlines()[2])
        | adamw | 2.500 | 800 | 8.00 | 1.00 | 2,048 | 0.0 |
    """
    lines = ["| optimizer | val loss | state bytes | state B/param | opt ms/step | tokens/s "
             "| first step s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['val_loss']:.3f} | {r['state_bytes']:,} | "
                     f"{r['state_bytes_per_param']:.2f} | {r['opt_ms']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Saves loss curves (training, smoothed; validation, dots) and state bytes as a PNG.

    Raises:
        ImportError: if matplotlib is not installed.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_mem = fig.subplots(1, 2, width_ratios=(1.6, 1))
    for i, r in enumerate(rows):
        color = f"C{i}"
        loss = torch.tensor(r["train_loss"])
        window = max(1, len(loss) // 25)
        smooth = loss.unfold(0, window, 1).mean(1) if len(loss) >= window else loss
        ax_loss.plot(range(window, window + len(smooth)), smooth, color=color, alpha=0.8,
                     label=f"{r['optimizer']} (train)")
        steps, vals = zip(*r["val_curve"])
        ax_loss.plot(steps, vals, "o--", color=color, markersize=4, label=f"{r['optimizer']} (val)")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    names = [r["optimizer"] for r in rows]
    kib = [r["state_bytes"] / 1024 for r in rows]
    bars = ax_mem.bar(names, kib, color=[f"C{i}" for i in range(len(rows))])
    ax_mem.bar_label(bars, labels=[f"{r['state_bytes_per_param']:.2f} B/param" for r in rows],
                     fontsize=8)
    ax_mem.set(ylabel="optimizer state (KiB)", title="optimizer-state memory")
    ax_mem.tick_params(axis="x", labelrotation=20)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------- options --
def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _optimizer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {', '.join(map(repr, unknown)) or repr(text)}; "
            f"choose from {', '.join(OPTIMIZERS)}")
    return list(dict.fromkeys(names))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of ``python -m afx.demo``.

    Example:
        >>> from afx.demo import build_parser
        >>> build_parser().parse_args(["--steps", "10"]).steps
        10
    """
    parser = argparse.ArgumentParser(prog="afx-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_positive_int, default=250,
                        help="training steps per optimizer (default: %(default)s)")
    parser.add_argument("--optimizers", type=_optimizer_list, default=",".join(OPTIMIZERS),
                        help="comma-separated subset of %(default)s (default: all)")
    parser.add_argument("--out", default="afx-demo",
                        help=f"output folder for {PNG_NAME} and {TABLE_NAME}, created if "
                             "needed; '' writes nothing (default: %(default)s)")
    parser.add_argument("--seed", type=_int, default=0,
                        help="seed of the model and the batches (default: %(default)s)")
    parser.add_argument("--threads", type=_non_negative_int, default=0,
                        help="torch CPU threads; 0 keeps torch's default (default: 0)")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="peak learning rate for every optimizer (default: one per "
                             "optimizer, " + ", ".join(f"{k} {v:g}" for k, v in
                                                       LEARNING_RATES.items()) + ")")
    parser.add_argument("--no-compile", action="store_true",
                        help="run afx's optimizers eagerly, without torch.compile")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    model = parser.add_argument_group("model and data")
    model.add_argument("--d-model", type=_positive_int, default=64,
                       help="transformer width (default: %(default)s)")
    model.add_argument("--layers", type=_positive_int, default=2,
                       help="transformer blocks (default: %(default)s)")
    model.add_argument("--heads", type=_positive_int, default=4,
                       help="attention heads (default: %(default)s)")
    model.add_argument("--context", type=_positive_int, default=64,
                       help="characters per training sequence (default: %(default)s)")
    model.add_argument("--batch-size", type=_positive_int, default=32,
                       help="sequences per step (default: %(default)s)")
    return parser


def _check_out_dir(parser: argparse.ArgumentParser, out: str) -> Path | None:
    """Creates the output folder and proves it is writable, before any training."""
    if not out:
        return None
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".afx-demo-write-test-"):
            pass
    except OSError as err:
        parser.error(f"argument --out: cannot write to {str(path)!r}: "
                     f"{err.strerror or err}")
    return path


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the demo: trains, prints the table, writes the table and the PNG.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        One dict of measurements per optimizer (``optimizer``, ``val_loss``, ``state_bytes``,
        ``opt_ms``, ``tokens_per_s``, ``train_loss``, ...).

    Raises:
        SystemExit: with code 2 and a message naming the option for an invalid option or an
            output folder that cannot be written.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.d_model % args.heads:
        parser.error(f"argument --d-model: {args.d_model} is not a multiple of --heads "
                     f"{args.heads}")
    out = _check_out_dir(parser, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)

    text = corpus()
    tokens, vocab = encode_text(text)
    split = int(0.9 * len(tokens))
    vgen = torch.Generator().manual_seed(1234)
    val_batches = [sample_batch(tokens[split:], args.batch_size, args.context, vgen)
                   for _ in range(8)]
    print(f"corpus: {len(text):,} characters of Python's standard library "
          f"({len(vocab)} distinct); model: {args.layers}-layer transformer, "
          f"d={args.d_model}, context {args.context}; {args.steps} steps of "
          f"{args.batch_size}x{args.context} characters, {torch.get_num_threads()} threads",
          flush=True)
    rows = [train_one(name, args, tokens, split, len(vocab), val_batches)
            for name in args.optimizers]
    print(f"\n{rows[0]['params']:,} parameters. val loss: nats/char on held-out text; "
          f"opt ms/step: median optimizer.step() time after the first step; tokens/s: whole "
          f"training step; first step: includes afx's one-time compilation.\n")
    table = format_table(rows)
    print(table)
    if out is not None:
        (out / TABLE_NAME).write_text(table + "\n")
        try:
            plot(rows, out / PNG_NAME)
        except ImportError:
            print(f"\nPNG skipped: matplotlib is not installed (pip install matplotlib, or "
                  f"pip install -e \".[demo]\" in the afx checkout). Table saved to "
                  f"{out / TABLE_NAME}.")
        else:
            print(f"\nSaved {out / PNG_NAME} (loss curves, state memory) and {out / TABLE_NAME}.")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m afx.demo`` and ``afx-demo``: :func:`run` without a result.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: with code 2 for an invalid option or an unwritable output folder.

    Example:
        >>> from afx.demo import main
        >>> main(["--steps", "0"])  # doctest: +SKIP
        usage: afx-demo [-h] ...
        afx-demo: error: argument --steps: must be a positive integer, got '0'
    """
    run(argv)


if __name__ == "__main__":
    main()
