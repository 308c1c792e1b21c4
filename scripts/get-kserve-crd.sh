#!/usr/bin/env bash
# Fetches KServe's InferenceService CRD (the "full" one: KServe's complete structural schema)
# from the Go module github.com/kserve/kserve at a pinned tag, through the Go module proxy, for
# the tests that install it into the test cluster (tests/e2e/test_kserve_e2e.py). The module's
# h1: sum and the CRD file's sha256 are both checked before the file is kept. Prints the path.
#
#   scripts/get-kserve-crd.sh [DEST_ROOT]     (default: .tools/kserve)
#
# Test infrastructure only: KServe's CRD (Apache-2.0, The KServe Authors; its LICENSE is kept
# beside it) is ~1.1 MB, so it is fetched, not vendored.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION=v0.17.0
MODULE_SUM="h1:IaynaBFzVQz1Xyrw5n3ncqzd5Y7L1RkO+YWvVwwtMQE="
CRD_PATH=config/crd/full/serving.kserve.io_inferenceservices.yaml
CRD_SHA256=b6c30a83b771f791e5de3a30d46ddd2f44e3caeffdc8c132e7c8c145ab209dae
DEST="${1:-$ROOT/.tools/kserve}/$VERSION"
NAME="$(basename "$CRD_PATH")"

fail() { echo "error: $*" >&2; exit 1; }
if [[ -s "$DEST/$NAME" && -s "$DEST/LICENSE" ]]; then echo "$DEST/$NAME"; exit 0; fi

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[[ -x "$GO" ]] || fail "no Go toolchain (go not on PATH, no /usr/local/go/bin/go): it fetches the KServe module"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Outside any module (a temp dir): only the module's zip is downloaded, nothing is built.
(cd "$work" && GOTOOLCHAIN=local GOFLAGS=-mod=mod "$GO" mod download -json "github.com/kserve/kserve@$VERSION") \
  >"$work/download.json" 2>"$work/download.err" \
  || fail "go mod download github.com/kserve/kserve@$VERSION failed: $(tail -n 3 "$work/download.err" "$work/download.json" | tr '\n' ' ')"
mkdir -p "$DEST"
python3 - "$work/download.json" "$DEST" "$VERSION" "$MODULE_SUM" "$CRD_PATH" "$CRD_SHA256" <<'PY'
import hashlib, json, os, sys, zipfile
info, dest, version, module_sum, crd_path, crd_sha = sys.argv[1:]
meta = json.load(open(info))
if meta.get("Error"):
    sys.exit(f"error: github.com/kserve/kserve@{version}: {meta['Error']}")
if meta.get("Sum") != module_sum:
    sys.exit(f"error: github.com/kserve/kserve@{version}: module sum {meta.get('Sum')}, expected {module_sum}")
prefix = f"github.com/kserve/kserve@{version}/"
with zipfile.ZipFile(meta["Zip"]) as z:
    crd = z.read(prefix + crd_path)
    license_text = z.read(prefix + "LICENSE")
digest = hashlib.sha256(crd).hexdigest()
if digest != crd_sha:
    sys.exit(f"error: {crd_path}: sha256 {digest}, expected {crd_sha}")
name = os.path.basename(crd_path)
for target, data in (("LICENSE", license_text), (name, crd)):  # the CRD last: its presence means done
    with open(os.path.join(dest, target + ".part"), "wb") as out:
        out.write(data)
    os.replace(os.path.join(dest, target + ".part"), os.path.join(dest, target))
PY
echo "$DEST/$NAME"
