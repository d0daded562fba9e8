"""modelbudget: cost-bounded autoscaling of model serving on Kubernetes."""

__version__ = "0.1.0"
