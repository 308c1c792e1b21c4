#!/usr/bin/env bash
# Installs a real MLflow tracking server into its own venv (default .tools/mlflow), for the
# registry tests: mlflow pins many packages, and keeping it apart means none of its pins touch
# the project's venv. kubetune itself never imports mlflow (it talks MLflow's REST API).
# Idempotent: a venv whose `mlflow --version` prints the pinned version is left alone.
# Usage: scripts/install-mlflow.sh [DEST]
set -euo pipefail
version=3.17.2
dest=${1:-.tools/mlflow}
# Through the venv's python: bin/mlflow's #! line breaks when the venv was made elsewhere.
if [ -x "$dest/bin/python" ] && "$dest/bin/python" -m mlflow --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
rm -rf "$dest"
python3 -m venv "$dest"
"$dest/bin/pip" install -q --disable-pip-version-check "mlflow==$version" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$dest/bin/python" -m mlflow --version
