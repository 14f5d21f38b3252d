#!/usr/bin/env bash
# A Python virtual environment with onnxruntime and onnx, for the ONNX export
# test (tests/onnx.rs runs this itself when the environment is missing; CI
# runs it first). Usage: scripts/onnx-venv.sh DIR
set -euo pipefail
dir=${1:?usage: scripts/onnx-venv.sh DIR}
if [[ -x $dir/bin/python ]] && "$dir/bin/python" -c "import onnxruntime, onnx, numpy" 2>/dev/null; then
    exit 0
fi
rm -rf "$dir"
# Without the venv module (Debian's python3 without python3-venv), a plain
# folder of packages on PYTHONPATH does the same job.
if python3 -m venv "$dir" 2>/dev/null && [[ -x $dir/bin/pip ]]; then
    "$dir/bin/pip" install --quiet --disable-pip-version-check "onnxruntime>=1.17" "onnx>=1.15" numpy
else
    rm -rf "$dir"
    mkdir -p "$dir/bin" "$dir/site"
    python3 -m pip install --quiet --disable-pip-version-check --target "$dir/site" "onnxruntime>=1.17" "onnx>=1.15" numpy
    printf '#!/bin/sh\nPYTHONPATH="%s/site${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$(cd "$dir" && pwd)" >"$dir/bin/python"
    chmod +x "$dir/bin/python"
fi
"$dir/bin/python" -c "import onnxruntime, onnx, numpy"
