"""Command line of the parity harness: ``python -m interop.parity`` (and ``python -m interop``)."""

from __future__ import annotations

import argparse
import sys
import time

from heads_common import check_split_config
from heads_common.options import check_label_smoothing, check_lse_square_scale, check_softcap

DESCRIPTION = """\
Check that the PyTorch and Flax language-modelling heads compute the same loss and gradients.

Builds a torch SplitLanguageModellingHead, ports its weights into the Flax one, runs both on the
same hidden states, labels (with ignored positions) and upstream gradient with every chosen
implementation, and prints, for each pair of implementations and each output (the loss, the
gradient of the hidden states, the gradient of every split weight), the largest absolute and the
relative (in norm) difference, the bound from the project's tolerance table and a verdict. Each
implementation is also judged against a float64 ground truth. Exits 1 on any mismatch.

The loss options (--softcap, --label-smoothing, --lse-square-scale, --bias; --shift goes to
linear_cross_entropy with the head's parameters) apply to the first row group; only implementations
that support them run there. A second row group, "all options on" (softcap 30, label smoothing 0.1,
lse square scale 1e-4, a bias per split, shift 1), runs every default implementation that supports
all of them, against the float64 truth with those options and across frameworks (--no-all-options
leaves it out).

The default is a small Gemma-like head (32 000 + 3 vocabulary, hidden size 288, 2 x 61 tokens):
seconds on a CPU. On a CUDA machine it compares cce / chunked / reference with pallas / chunked /
reference.
"""


SEED_MAX = 2**63 - 1  # torch's and JAX's seeds are 64-bit


def _int_in(low: int, high: int | None = None):
    """An argparse ``type`` for an integer in ``[low, high]`` (no upper bound for None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {wanted}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _checked_float(check):
    """An argparse ``type`` for a float that ``check`` (a ``heads_common.options`` check) accepts."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check(value)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _splits(text: str) -> tuple[tuple[str, int], ...]:
    try:
        pairs = tuple((name, int(size)) for name, size in (item.split("=") for item in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE[,NAME=SIZE...], got {text!r}") from None
    try:
        check_split_config(dict(pairs), [name for name, _ in pairs])
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return pairs


def _impls(text: str) -> tuple[str, ...]:
    return tuple(filter(None, text.split(",")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m interop.parity", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=_int_in(1), default=2, help="batch size B >= 1 (default 2)")
    p.add_argument("--seq", type=_int_in(1), default=61, help="sequence length S >= 1 (default 61)")
    p.add_argument("--hidden-size", type=_int_in(1), default=288, help="hidden size H >= 1 (default 288)")
    p.add_argument(
        "--splits", type=_splits, default=(("text", 32_000), ("special", 3)),
        help="vocabulary splits in order, NAME=SIZE,... (default text=32000,special=3)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="default float32")
    p.add_argument(
        "--torch-impls", type=_impls, default=None, help="comma-separated, e.g. cce,chunked (default: all that run)"
    )
    p.add_argument(
        "--jax-impls", type=_impls, default=None, help="comma-separated, e.g. pallas,chunked (default: all that run)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    p.add_argument("--seed", type=_int_in(0, SEED_MAX), default=0, help="in [0, 2**63 - 1] (default 0)")
    p.add_argument(
        "--ignore-fraction", type=_fraction, default=0.2, help="share of labels set to the ignore index, in [0, 1]"
    )
    p.add_argument("--softcap", type=_checked_float(check_softcap), default=None, help="logit soft-cap c > 0")
    p.add_argument(
        "--label-smoothing", type=_checked_float(check_label_smoothing), default=0.0, help="in [0, 1) (default 0)"
    )
    p.add_argument(
        "--lse-square-scale", type=_checked_float(check_lse_square_scale), default=0.0,
        help="z-loss weight >= 0 (default 0)",
    )
    p.add_argument("--bias", action="store_true", help="heads with one bias per split")
    p.add_argument("--shift", type=_int_in(0), default=0, help="label shift k, 0 <= k < seq (default 0)")
    p.add_argument("--no-all-options", action="store_true", help='leave out the "all options on" row group')
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shift >= args.seq:
        parser.error(f"argument --shift: must be smaller than --seq ({args.seq}), got {args.shift}")
    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {message} ...", file=sys.stderr, flush=True)

    progress("importing torch and JAX")
    from interop.parity import ParityConfig, run_parity

    config = ParityConfig(
        batch=args.batch,
        seq=args.seq,
        hidden_size=args.hidden_size,
        splits=args.splits,
        dtype=args.dtype,
        torch_impls=args.torch_impls,
        jax_impls=args.jax_impls,
        device=args.device,
        seed=args.seed,
        ignore_fraction=args.ignore_fraction,
        softcap=args.softcap,
        label_smoothing=args.label_smoothing,
        lse_square_scale=args.lse_square_scale,
        bias=args.bias,
        shift=args.shift,
        all_options=not args.no_all_options,
    )
    try:
        report = run_parity(config, progress=progress)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    vocab = sum(size for _, size in config.splits)
    print(
        f"parity of SplitLanguageModellingHead: B={config.batch} S={config.seq} H={config.hidden_size} "
        f"V={vocab} ({', '.join(f'{n}={s}' for n, s in config.splits)}), {config.dtype}, device {report.device}, "
        f"{config.ignore_fraction:.0%} ignored; {config.loss_setup.describe()}"
    )
    print(report.table())
    failed = sum(c.passed is False for c in report.checks)
    print(f"\n{'PASS' if report.passed else 'FAIL'}: {len(report.checks)} outputs compared, {failed} out of bounds, "
          f"{report.seconds:.1f}s")
    return 0 if report.passed else 1
