"""The gate: the serving-path sidecar that enforces the token limit and the admission cap.

``modelbudget gate`` runs in every serving pod in front of the model server: it clamps
``max_tokens``/``max_completion_tokens`` on the OpenAI completion paths to the limit the
operator publishes, admits the pod's share of the admitted request rate, and exports what
the operator cannot see otherwise (true arrivals, the tokens clients asked for, the limit it
applies now). docs/gate.md has the contract.

Depends on nothing in modelbudget but ``api``.
"""

GATE_PORT = 8080  # the gate's serving port (the Service's targetPort lands here)
METRICS_PORT = 9464  # the gate's own /metrics and /healthz, never forwarded
