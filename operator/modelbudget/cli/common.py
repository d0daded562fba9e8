"""Helpers shared by subcommands: loading a ModelBudget manifest with readable errors."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from modelbudget.api import ModelBudget
from modelbudget.cli import CliError


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_manifest(path: str) -> ModelBudget:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise CliError(f"{path} does not hold a ModelBudget manifest")
    try:
        return ModelBudget.model_validate(doc)
    except ValidationError as exc:
        raise CliError(f"{path} is not a valid ModelBudget:\n{format_validation_error(exc)}") from exc
