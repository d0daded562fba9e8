"""The operator proper: kopf handlers (thin), the reconcile flow, status logic, metrics, leadership."""
