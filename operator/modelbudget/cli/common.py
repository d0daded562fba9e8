"""Helpers shared by subcommands: loading a ModelBudget manifest with readable errors.

A file may hold several documents (e.g. a GpuPool and the ModelBudgets drawing from it): the
ModelBudget is the first of its kind. Offline (plan, simulate, replay) each shared pool is seen
as the operator would see it with nothing granted yet -- this ModelBudget alone on the pool,
billed per GPU -- from the GpuPool declared in the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from modelbudget.api import ModelBudget
from modelbudget.api.pool import POOL_KIND, GpuPoolSpec
from modelbudget.cli import CliError
from modelbudget.core.pools import pool_view, with_views


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def _documents(path: str) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML: {exc}") from exc


def load_manifest(path: str) -> ModelBudget:
    docs = _documents(path)
    doc = next((d for d in docs if isinstance(d, dict) and d.get("kind") == "ModelBudget"), None)
    if doc is None:
        doc = docs[0] if len(docs) == 1 else None  # a lone document: say what is wrong with it
    if not isinstance(doc, dict):
        raise CliError(f"{path} does not hold a ModelBudget manifest")
    try:
        manifest = ModelBudget.model_validate(doc)
    except ValidationError as exc:
        raise CliError(f"{path} is not a valid ModelBudget:\n{format_validation_error(exc)}") from exc
    spec = manifest.spec
    if not spec.shared_pools:
        return manifest
    declared = load_gpu_pools(path)
    missing = [s.pool for s in spec.shared_pools if s.pool not in declared]
    if missing:
        raise CliError(f"{path}: no GpuPool {', '.join(missing)} in the file (its price and bounds are read there)")
    meta = manifest.metadata
    views = [
        pool_view(s, declared[s.pool], None, meta.namespace or "", meta.name, spec.replicas.gpus_per_replica)
        for s in spec.shared_pools
    ]
    return manifest.model_copy(update={"spec": with_views(spec, views)})


def load_gpu_pools(path: str) -> dict[str, GpuPoolSpec]:
    """The GpuPools declared in the file, by name."""
    pools = {}
    for doc in _documents(path):
        if isinstance(doc, dict) and doc.get("kind") == POOL_KIND:
            name = (doc.get("metadata") or {}).get("name", "?")
            try:
                pools[name] = GpuPoolSpec.model_validate(doc.get("spec") or {})
            except ValidationError as exc:
                raise CliError(f"{path}: GpuPool {name} is not valid:\n{format_validation_error(exc)}") from exc
    return pools
