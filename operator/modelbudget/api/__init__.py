"""The ModelBudget API (modelbudget.dev/v1alpha1): pydantic models the CRD is generated from."""

from modelbudget.api.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, ModelBudget, ModelBudgetSpec
from modelbudget.api.status import ControllerState, ModelBudgetStatus, Plan

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "ControllerState",
    "ModelBudget",
    "ModelBudgetSpec",
    "ModelBudgetStatus",
    "Plan",
]
