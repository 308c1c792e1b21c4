#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, to try kubetune by hand and to run the tests on:
# etcd, kube-apiserver, kube-controller-manager, the process kubelet (pods run as local
# processes) and, with `kueue`, Kueue. Binaries come from scripts/build-cluster.sh (cached).
#
#   scripts/dev-cluster.sh up DIR [kueue]   # then: export KUBECONFIG=DIR/kubeconfig
#   scripts/dev-cluster.sh down DIR         # stops every process `up` started, by PID
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$( [[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || command -v python3 )}"
if [[ "${1:-}" == "up" ]]; then
  "$ROOT/scripts/build-cluster.sh" >/dev/null
fi
cd "$ROOT"
export PYTHONPATH="$ROOT:$ROOT/operator:$ROOT/trainer-image${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m tests.support.controlplane "$@"
