#!/usr/bin/env bash
# A sweep over k and architectures, two ways.
#   bash scripts/sweep_k_arch.sh experiment=safesail-qwen3b
# 1) One pass (the default, cheapest): every SAE of the sweep reads each batch once.
#    The grid is in configs/sae/*.yaml; override it on the command line:
#      safesail train 'sae.saes=[{arch: topk, k: [32, 64, 200]}, {arch: jumprelu}]'
# 2) One job per config (Hydra multirun), e.g. to spread jobs over a cluster launcher;
#    every job writes its own saes/<hook>/<arch>-k<k>/ into the same run directory:
#      safesail train -m sae.arch=topk sae.k=32,64,200
set -euo pipefail
MODE=${MODE:-one-pass}
if [ "$MODE" = multirun ]; then
  safesail cache "$@"
  safesail train -m sae.arch=topk sae.k=${KS:-32,64,128,200} "$@"
else
  safesail cache "$@"
  safesail train 'sae.saes=[{arch: topk, k: [32, 64, 128, 200]}, {arch: batchtopk, k: 200}, {arch: jumprelu}, {arch: relu}]' "$@"
fi
safesail select "$@"
