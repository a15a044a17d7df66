#!/usr/bin/env bash
# Interpretation (collect -> explain -> score -> tag -> db build) with a vLLM server
# as the explainer and simulator. vLLM returns prompt log-probabilities, so the
# simulator runs in its exact all-at-once logprob mode.
#
# Start the server first (another terminal or node), e.g.:
#   vllm serve Qwen/Qwen2.5-72B-Instruct --port 8000 --tensor-parallel-size 4 --max-model-len 32768
# then:
#   VLLM_MODEL=Qwen/Qwen2.5-72B-Instruct bash scripts/interpret_with_vllm.sh experiment=safesail-qwen3b
# Responses are cached in runs/<name>/interpret/llm_cache.sqlite: a re-run repeats no call.
set -euo pipefail
BASE_URL=${VLLM_BASE_URL:-http://localhost:8000/v1}
MODEL=${VLLM_MODEL:-Qwen/Qwen2.5-72B-Instruct}
if ! curl -sf "$BASE_URL/models" >/dev/null; then
  echo "error: no vLLM server answers at $BASE_URL; start one with: vllm serve $MODEL --port 8000" >&2
  exit 2
fi
ARGS=(llm=vllm "llm.base_url=$BASE_URL" "llm.model=$MODEL" "$@")
safesail collect "${ARGS[@]}"
safesail explain "${ARGS[@]}"
safesail score "${ARGS[@]}"
safesail tag "${ARGS[@]}"
safesail db build "${ARGS[@]}"
