# Everyday entry points; the scripts under hack/ do the work.
.PHONY: setup test test-unit lint crd binaries testbed-up testbed-down demo bench

setup:          ## venv, Python deps, Debian prometheus
	hack/setup.sh

test:           ## everything CI runs: lint, unit tier, control-plane build, e2e tier
	hack/test.sh

test-unit:      ## lint + unit tier only (no cluster)
	MB_SKIP_E2E=1 hack/test.sh

crd:            ## regenerate crds/ (and the chart's copy) from the API models
	.venv/bin/modelbudget crd --out-dir crds
	cp crds/modelbudget.dev_modelbudgets.yaml crds/modelbudget.dev_gpupools.yaml charts/modelbudget-operator/files/

binaries:       ## build kube-*, etcd, kwok, helm into ~/.cache/modelbudget (cached)
	hack/build-binaries.sh

testbed-up:     ## start the local control plane, fake GPU nodes and Prometheus
	hack/testbed.sh up

testbed-down:
	hack/testbed.sh down

demo:           ## the whole thing on the local testbed: watch `kubectl get mb -n demo -w`
	hack/setup.sh && hack/build-binaries.sh && hack/demo.sh

bench:          ## benchmarks: decide, simulator, trace replay
	.venv/bin/python bench/decide.py && .venv/bin/python bench/simulate.py
