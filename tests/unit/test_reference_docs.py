"""docs/reference.md is generated from the API models; it must not go stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from modelbudget.api.reasons import Reason
from modelbudget.api.spec import ModelBudgetSpec

REPO = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    # hack/ is scripts, not a package: load the file by path.
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "hack" / "gen-reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_up_to_date() -> None:
    text = (REPO / "docs" / "reference.md").read_text()
    assert text == _generator().render(), "docs/reference.md is stale: run .venv/bin/python hack/gen-reference.py"


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds (through ``X | None`` and ``list[X]``) and ``"[]"`` for a list."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is list:
        inner, _ = _model_in(args[0])
        return inner, "[]"
    if args and get_origin(annotation) is not dict:
        return _model_in(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    return None, ""


def _fields(model: type[BaseModel], prefix: str) -> set[str]:
    """Every field path of a spec model, camelCase as on the wire, list items marked ``[]``."""
    paths = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}.{info.alias or name}"
        paths.add(path)
        inner, suffix = _model_in(info.annotation)
        if inner is not None:
            paths |= _fields(inner, path + suffix)
    return paths


def test_every_spec_field_is_documented() -> None:
    text = (REPO / "docs" / "reference.md").read_text()
    sections = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## `"):
            current = line[4:-1]
            sections[current] = set()
        elif current and line.startswith("| ") and not line.startswith("| Field"):
            sections[current].add(line.split("`")[1])
    documented = {f"{section}.{field}" for section, fields in sections.items() for field in fields}
    assert _fields(ModelBudgetSpec, "spec") == documented


def test_every_reason_is_explained_in_troubleshooting() -> None:
    # Reasons are declared once (api/reasons.py); an SRE reading one in status or an Event finds it here.
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    missing = [r.value for r in Reason if f"`{r.value}`" not in text]
    assert not missing, f"docs/troubleshooting.md does not explain {missing}"
