"""``modelbudget crd``: write (or check) the CRDs generated from the API models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelbudget.api.crd import render_crds
from modelbudget.cli import CliError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("crd", help="generate the CustomResourceDefinitions from the API models")
    p.add_argument("--out-dir", default=None, help=f"write {', '.join(render_crds())} here (default: print to stdout)")
    p.add_argument("--check", action="store_true", help="fail if the file in --out-dir is out of date")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    crds = render_crds()
    if args.out_dir is None:
        sys.stdout.write("---\n".join(crds.values()))
        return 0
    for name, text in crds.items():
        path = Path(args.out_dir) / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                raise CliError(f"{path} is out of date: run `modelbudget crd --out-dir {args.out_dir}`")
            print(f"{path} is up to date")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0
