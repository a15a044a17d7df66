#!/usr/bin/env bash
# Multi-GPU (and multi-node) cache + train with accelerate.
#   bash scripts/accelerate_cache_train.sh experiment=safesail-qwen3b
# Every process composes the same Hydra config; the cache splits the corpus's
# windows across ranks (each writes its own shards), the trainer runs DDP or, with
# train.distributed=sae_parallel, one SAE of the sweep per GPU.
# Multi-node: set NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP (and the same command on each node).
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
LAUNCH=(accelerate launch --multi_gpu --num_processes $((NUM_GPUS * NUM_MACHINES))
        --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
        --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT")
if [ "$NUM_GPUS" -le 1 ] && [ "$NUM_MACHINES" -le 1 ]; then
  LAUNCH=(python)   # one device: no launcher needed
fi
"${LAUNCH[@]}" -m safesail cache "$@"
"${LAUNCH[@]}" -m safesail train "$@"
