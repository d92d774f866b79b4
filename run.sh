#!/usr/bin/env bash
# Set up gluonq's environment in ./.venv (Python 3.11) and run one job:
#   ./run.sh demo     convert a trained float MNIST model to int8; accuracy, size, speed
#   ./run.sh test     the test suite
#   ./run.sh bench    the inference benchmark (benchmarks/bench_inference.py)
#   ./run.sh env      only set up the environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
VENV=.venv
stamp=$VENV/.installed-$(cat setup.py constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  command -v "$PY" >/dev/null || { echo "run.sh: $PY not found; gluonq needs Python 3.11 (mxnet 1.9.1 with numpy 1.23.5)" >&2; exit 1; }
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e '.[test]'
  touch "$stamp"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
# idle OpenMP threads sleep instead of spinning (same results; much faster on shared cores)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export MXNET_SUBGRAPH_VERBOSE=0
job=${1:-test}; shift || true
case "$job" in
  demo)  exec "$VENV/bin/python" examples/demo.py "$@" ;;
  # one pytest worker per core (pytest-xdist); each test file runs whole on one worker, so
  # its module fixtures are built once. `./run.sh test -n 0` runs in this process.
  test)  exec "$VENV/bin/python" -m pytest -q -n "$(nproc)" --dist loadfile "$@" ;;
  bench) exec "$VENV/bin/python" benchmarks/bench_inference.py "$@" ;;
  env)   echo "environment ready: $VENV" ;;
  *)     echo "usage: ./run.sh demo|test|bench|env [args]" >&2; exit 2 ;;
esac
