#!/usr/bin/env bash
# Build the test cluster's control plane from the pinned Go wrapper modules in tests/cluster/:
# etcd, kube-apiserver, kube-controller-manager and Kueue, into .tools/cluster/<version>/.
# Does nothing when they are already there. Prints the directory on stdout.
#
#   scripts/build-cluster.sh [DEST_ROOT]     (default: .tools/cluster)
#
# Test infrastructure only: nothing built here ships with kubetune.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODULES="$ROOT/tests/cluster"
DEST_ROOT="${1:-$ROOT/.tools/cluster}"

fail() { echo "error: $*" >&2; exit 1; }

# The pinned versions, read from the wrapper modules.
mod_version() { awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$MODULES/$1/go.mod"; }
K8S="$(mod_version kubernetes k8s.io/kubernetes)"
ETCD="$(mod_version etcd go.etcd.io/etcd/server/v3)"
KUEUE="$(mod_version kueue sigs.k8s.io/kueue)"
[[ -n "$K8S" && -n "$ETCD" && -n "$KUEUE" ]] || fail "cannot read the pinned versions from $MODULES/*/go.mod"
DEST="$DEST_ROOT/k8s-$K8S-etcd-$ETCD-kueue-$KUEUE"
BINARIES=(etcd kube-apiserver kube-controller-manager kueue)

complete() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$DEST/$b" ]] || return 1; done
  [[ -d "$DEST/kueue-config/crds" && -d "$DEST/kueue-config/rbac" ]]
}
if complete; then echo "$DEST"; exit 0; fi

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[[ -x "$GO" ]] || fail "no Go toolchain (go not on PATH, no /usr/local/go/bin/go): install Go >= 1.26 to build the test cluster"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
mkdir -p "$DEST_ROOT"
LOGS="$DEST_ROOT/build-logs"
mkdir -p "$LOGS"
STAGE="$(mktemp -d "$DEST_ROOT/.build.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

build() { # build MODULE OUTPUT PACKAGE LDFLAGS
  local module="$1" out="$2" pkg="$3" ldflags="$4" log="$LOGS/$2.log"
  echo "building $out ($pkg) ..." >&2
  if ! (cd "$MODULES/$module" && "$GO" build -trimpath -ldflags "-s -w $ldflags" -o "$STAGE/$out" "$pkg") >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    fail "building $out failed; log: $log"
  fi
}

date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
k8s_ldflags=""
minor="${K8S#v*.}"; minor="${minor%%.*}"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$K8S -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=$K8S -X $pkg.buildDate=$date"
done

# Only what is missing (a cache from an older script may lack a part).
missing() { [[ ! -x "$DEST/$1" ]]; }
missing etcd && build etcd etcd go.etcd.io/etcd/server/v3 "-X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD"
missing kube-apiserver && build kubernetes kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
missing kube-controller-manager && build kubernetes kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"
missing kueue && build kueue kueue sigs.k8s.io/kueue/cmd/kueue \
  "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE -X sigs.k8s.io/kueue/pkg/version.BuildDate=$date"

# Kueue's CRDs, webhook configuration and RBAC (the manager's ServiceAccount and roles), from
# the same module version.
kueue_dir="$(cd "$MODULES/kueue" && "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
mkdir -p "$STAGE/kueue-config"
cp -r "$kueue_dir/config/components/crd/bases" "$STAGE/kueue-config/crds"
cp "$kueue_dir/config/components/webhook/manifests.yaml" "$STAGE/kueue-config/webhooks.yaml"
cp -r "$kueue_dir/config/components/rbac" "$STAGE/kueue-config/rbac"
chmod -R u+w "$STAGE/kueue-config"

mkdir -p "$DEST/kueue-config"
for b in "${BINARIES[@]}"; do [[ -e "$STAGE/$b" ]] && mv "$STAGE/$b" "$DEST/$b"; done
for part in crds webhooks.yaml rbac; do  # added, never swapped under a running cluster
  [[ -e "$DEST/kueue-config/$part" ]] || mv "$STAGE/kueue-config/$part" "$DEST/kueue-config/$part"
done
echo "$DEST"
