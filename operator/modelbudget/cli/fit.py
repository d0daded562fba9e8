"""``modelbudget fit samples.csv``: fit a + b ln t and print the ModelBudget snippet."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import yaml

from modelbudget.cli import CliError
from modelbudget.core.curve import CurveFitError, fit_curve


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fit", help="fit a token-performance curve from (tokens, performance) samples")
    p.add_argument("samples", help="CSV with a header; columns named by --tokens-column/--performance-column")
    p.add_argument("--tokens-column", default="tokens")
    p.add_argument("--performance-column", default="performance")
    p.add_argument("--min-tokens", type=int, default=None, help="valid range start (default: smallest sample)")
    p.add_argument("--max-tokens", type=int, default=None, help="valid range end (default: largest sample)")
    p.set_defaults(func=run)


def read_samples(path: str, tokens_col: str, perf_col: str) -> tuple[list[float], list[float]]:
    try:
        with Path(path).open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {tokens_col, perf_col} - set(reader.fieldnames or [])
            if missing:
                raise CliError(f"{path} has no column(s) {', '.join(sorted(missing))} (has: {reader.fieldnames})")
            tokens, perf = [], []
            for line, row in enumerate(reader, start=2):
                try:
                    tokens.append(float(row[tokens_col]))
                    perf.append(float(row[perf_col]))
                except (TypeError, ValueError) as exc:
                    raise CliError(f"{path}:{line}: not a number ({row})") from exc
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc
    return tokens, perf


def run(args: argparse.Namespace) -> int:
    tokens, perf = read_samples(args.samples, args.tokens_column, args.performance_column)
    try:
        curve = fit_curve(tokens, perf, args.min_tokens, args.max_tokens)
    except CurveFitError as exc:
        raise CliError(str(exc)) from exc
    print(f"perf(t) = {curve.intercept:.4f} + {curve.slope:.4f} * ln(t)    R^2 = {curve.r_squared:.4f}")
    print(
        f"each doubling of tokens buys {curve.slope * math.log(2):.4f} points; "
        f"valid on [{curve.min_tokens}, {curve.max_tokens}] tokens"
    )
    print("\n# paste into your ModelBudget spec:")
    snippet = {
        "curve": {
            "intercept": round(curve.intercept, 6),
            "slope": round(curve.slope, 6),
            "minTokens": curve.min_tokens,
            "maxTokens": curve.max_tokens,
        }
    }
    print(yaml.safe_dump(snippet, sort_keys=False), end="")
    return 0
