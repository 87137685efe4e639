#!/usr/bin/env bash
# One-GPU acceptance check (estimated 7-8 min on an H100/H200, not yet timed on one): both trainers
# through the deepspeed launcher at ZeRO-2/3 in fp16 and bf16, block-sparse vs dense attention on
# CUDA, each attention path's speed (speed/attention-flex), KV-cache sampling, the DALL-E trainer's
# dalle-1.3b throughput, MFU and peak memory against the dry run per attention_impl.
# PASS/FAIL per check, a JSON report (--out, default outputs/gpu_check/report.json), exit 1 on any
# failure, 2 without a CUDA device.
# Args go to scripts/gpu_check.py: --list, --only PREFIXES, --jobs N, --cpu-smoke.
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
fi
exec python "$(dirname "$0")/gpu_check.py" "$@"
