"""Evaluate a CRD's CEL rules offline (cel-python), the way the apiserver walks the schema."""

from __future__ import annotations

from typing import Any

import celpy

_env = celpy.Environment()
_programs: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _programs:
        _programs[rule] = _env.program(_env.compile(rule))
    return _programs[rule]


def with_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """The object as the apiserver stores it: schema defaults filled in, before validation."""
    if isinstance(obj, dict):
        out = dict(obj)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
            if key in out:
                out[key] = with_defaults(sub, out[key])
        return out
    if isinstance(obj, list) and "items" in schema:
        return [with_defaults(schema["items"], item) for item in obj]
    return obj


def cel_violations(schema: dict[str, Any], obj: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, message) of every x-kubernetes-validations rule that ``obj`` breaks."""
    if not path:
        obj = with_defaults(schema, obj)
    found: list[tuple[str, str]] = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not bool(_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(obj)})):
            found.append((path or ".", rule["message"]))
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in obj:
                found += cel_violations(sub, obj[key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += cel_violations(schema["items"], item, f"{path}[{i}]")
    return found
