"""Cross-field validation rules, declared once and enforced twice.

Every rule carries a CEL expression (rendered into the CRD as ``x-kubernetes-validations`` so
the apiserver rejects a bad object at ``kubectl apply``) and a Python predicate (run by the
pydantic model so the CLI, the simulator and the operator reject the same object with the same
message).  Declaring both side by side keeps them from drifting apart; ``tests/unit/test_api.py``
and the e2e tier check each pair on the same bad manifests, in Python and in a real apiserver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, model_validator

ModelT = TypeVar("ModelT", bound=type[BaseModel])

# Models with rules by class name: the CRD generator finds them by their JSON-schema $defs name.
RULED_MODELS: dict[str, type[BaseModel]] = {}


@dataclass(frozen=True)
class CrossFieldRule:
    cel: str
    message: str
    check: Callable[[Any], bool]


def cross_field_rules(*rules: CrossFieldRule) -> Callable[[ModelT], ModelT]:
    """Attach rules to a model: CEL into its JSON schema, the predicate into validation."""

    def decorate(cls: ModelT) -> ModelT:
        cls.__cross_field_rules__ = rules  # type: ignore[attr-defined]
        RULED_MODELS[cls.__name__] = cls
        return cls

    return decorate


def rules_of(cls: type[BaseModel]) -> tuple[CrossFieldRule, ...]:
    return tuple(cls.__dict__.get("__cross_field_rules__", ()))


class RuleCheckedModel(BaseModel):
    """Base for models with cross-field rules: runs each rule's predicate after field validation."""

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> RuleCheckedModel:
        # Read in place, not through ``rules_of``: this runs for every model built, nested ones
        # included (a ControllerState's recommendations), most of which have no rules at all.
        for rule in type(self).__dict__.get("__cross_field_rules__", ()):
            if not rule.check(self):
                raise ValueError(rule.message)
        return self
