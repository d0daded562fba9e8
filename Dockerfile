# The operator image: `modelbudget run` on a slim Python 3.11, as a numeric non-root user.
#   docker build -t modelbudget/operator:0.1.0 .
# Stage 1 builds the project's wheel and installs it with its dependencies into a virtualenv;
# stage 2 copies only that virtualenv, so no compiler, build backend or source tree ships.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject.toml names README.md as the package's readme: the build needs both.
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="modelbudget-operator" \
      org.opencontainers.image.description="Cost-bounded autoscaling of model serving on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
# Bytecode was compiled at install time; the root filesystem is read-only at run time anyway.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
# Numeric, so that Kubernetes can check runAsNonRoot without resolving a name.
USER 65532:65532
# 8080: /metrics, 8081: /healthz (the chart passes --metrics-addr and --liveness).
EXPOSE 8080 8081
ENTRYPOINT ["modelbudget", "run"]
