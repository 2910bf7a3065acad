#!/usr/bin/env bash
# The GPU paths end to end, in a few minutes, on a machine with CUDA GPUs:
#   bf16 SFT on one GPU; SFT with DDP and with FSDP2 on all GPUs (NCCL, configs/accelerate/);
#   DPO (reference precompute) and RLOO (rollouts on gathered weights) on SmolLM2 under FSDP2;
#   if deepspeed is importable, SFT under ZeRO-2 and RLOO under ZeRO-3 (configs/accelerate/zero*.yaml);
#   vLLM rollouts only if vLLM is importable (preftune has no vLLM backend yet: reported, skipped).
# Then prints tokens/s, MFU and peak memory per run (scripts/gpu_report.py).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default runs/gpu_check; needs preftune installed
#
# Exits 2 at once, with a message, when no CUDA GPU is visible; non-zero when any run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_check}"
PY="${PYTHON:-python3}"

NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
if [ "$NGPU" -lt 1 ]; then
  echo "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False); this script checks the GPU paths and needs one. CPU paths: python3 -m pytest -q" >&2
  exit 2
fi
command -v accelerate >/dev/null || { echo "gpu_check: the 'accelerate' command is not on PATH (pip install accelerate)" >&2; exit 2; }
"$PY" -c 'import preftune' 2>/dev/null || { echo "gpu_check: preftune is not importable (bash scripts/install.sh)" >&2; exit 2; }
mkdir -p "$OUT"
if [ "$NGPU" -eq 1 ]; then echo "gpu_check: one GPU: DDP and FSDP2 run one process (FSDP2 shards over 1); NCCL between GPUs needs a multi-GPU machine"; fi
echo "gpu_check: $NGPU GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'); torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

MODEL="model.name=smollm2-135m-instruct model.dtype=bf16"
COMMON="train.progress_bar=false train.overwrite_output_dir=true train.save_steps=0"
failed=()
run() {  # run NAME COMMAND...: log to OUT/NAME.log, keep going on failure
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED after $((SECONDS - start)) s; last lines of $OUT/$name.log:"; tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
}
launch() { accelerate launch --config_file "configs/accelerate/$1" --num_processes "$NGPU" -m preftune train "${@:2}"; }

run sft_bf16 "$PY" -m preftune train configs/sft_smollm2_quick.yaml $MODEL $COMMON train.max_steps=20 output_dir="$OUT/sft_bf16"
run sft_ddp launch ddp.yaml configs/sft_smollm2_quick.yaml $MODEL $COMMON train.max_steps=20 output_dir="$OUT/sft_ddp"
run sft_fsdp2 launch fsdp2.yaml configs/sft_smollm2_quick.yaml $MODEL $COMMON train.max_steps=20 output_dir="$OUT/sft_fsdp2"
run dpo_fsdp2 launch fsdp2.yaml configs/dpo_smollm2_lora.yaml $MODEL $COMMON model.lora.enabled=false train.max_steps=12 \
  output_dir="$OUT/dpo_fsdp2"
run rloo_fsdp2 launch fsdp2.yaml configs/rloo_smollm2_vader.yaml $MODEL $COMMON model.lora.enabled=false train.max_steps=6 \
  train.learning_rate=1e-6 output_dir="$OUT/rloo_fsdp2"
run rloo_ddp_lora launch ddp.yaml configs/rloo_smollm2_vader.yaml $MODEL $COMMON train.max_steps=6 output_dir="$OUT/rloo_ddp_lora"
zero_runs=()
if "$PY" -c 'import deepspeed' 2>/dev/null; then
  run sft_zero2 launch zero2.yaml configs/sft_smollm2_quick.yaml $MODEL $COMMON train.max_steps=20 output_dir="$OUT/sft_zero2"
  run rloo_zero3 launch zero3.yaml configs/rloo_smollm2_vader.yaml $MODEL $COMMON model.lora.enabled=false train.max_steps=6 \
    train.learning_rate=1e-6 output_dir="$OUT/rloo_zero3"
  zero_runs=("$OUT/sft_zero2" "$OUT/rloo_zero3")
else
  echo "== deepspeed: not importable (bash scripts/install.sh --deepspeed): the ZeRO runs are skipped"
fi
# The exported folders load as ordinary models.
run load_models "$PY" -c "
import sys
from transformers import AutoModelForCausalLM
for d in sys.argv[1:]:
    AutoModelForCausalLM.from_pretrained(d); print('loaded', d)
" "$OUT/sft_fsdp2/model" "$OUT/dpo_fsdp2/model" "$OUT/rloo_fsdp2/model" "${zero_runs[@]/%//model}"

if "$PY" -c 'import vllm' 2>/dev/null; then
  echo "== vllm: importable ($("$PY" -c 'import vllm; print(vllm.__version__)')), but preftune has no vLLM rollout backend yet: skipped"
else
  echo "== vllm: not importable (not part of preftune; pip install vllm on a CUDA machine to check it): skipped"
fi

echo
GPUS_sft_bf16=1 "$PY" scripts/gpu_report.py "$OUT"/sft_bf16 "$OUT"/sft_ddp "$OUT"/sft_fsdp2 "$OUT"/dpo_fsdp2 "$OUT"/rloo_fsdp2 "$OUT"/rloo_ddp_lora "${zero_runs[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]} (logs in $OUT)" >&2
  exit 1
fi
echo "gpu_check: all runs passed (logs in $OUT)"
