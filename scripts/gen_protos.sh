#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC code beside the .proto files.
# Usage: scripts/gen_protos.sh            (regenerate)
#        scripts/gen_protos.sh --check    (fail when the committed code is stale)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=protos
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mapfile -t files < <(cd protos && find cachegate -name '*.proto' | sort)
(cd protos && "$OLDPWD/$PY" -m grpc_tools.protoc -I . \
  --python_out="$( [ "$out" = protos ] && echo . || echo "$out")" \
  --pyi_out="$( [ "$out" = protos ] && echo . || echo "$out")" \
  --grpc_python_out="$( [ "$out" = protos ] && echo . || echo "$out")" \
  "${files[@]}")
if [ "${1:-}" = "--check" ]; then
  stale=0
  while IFS= read -r f; do
    rel=${f#"$out"/}
    if ! cmp -s "$f" "protos/$rel"; then echo "stale generated code: protos/$rel (run scripts/gen_protos.sh)"; stale=1; fi
  done < <(find "$out" -name '*_pb2*.py*' | sort)
  exit $stale
fi
echo "generated code written under protos/"
