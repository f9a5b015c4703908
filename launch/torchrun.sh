#!/usr/bin/env bash
# Launch expertmesh with torchrun on one node or many. Copy and edit, or override by environment:
#   CONFIG          config file                  (configs/default.toml)
#   NNODES          nodes                        (1)
#   NPROC_PER_NODE  processes per node           (GPUs on this node, else 4)
#   RDZV_ENDPOINT   host:port of node 0          (required when NNODES > 1)
#   RDZV_ID         rendezvous id, same on all nodes (expertmesh)
#   MAX_RESTARTS    torchrun restarts after a worker failure; the run resumes from its checkpoint (0)
#   PYTHON          interpreter                  (.venv/bin/python if present, else python)
# Any arguments are config overrides:  ./launch/torchrun.sh train.steps=100 parallel.ep=2
# Multi-node: run the same command on every node, e.g.
#   NNODES=2 RDZV_ENDPOINT=node0:29500 ./launch/torchrun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
CONFIG=${CONFIG:-configs/default.toml}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 4)')}
if [ "$NNODES" = 1 ]; then
  RDZV=(--standalone)
else
  RDZV=(--rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}"
        --rdzv-id="${RDZV_ID:-expertmesh}")
fi
threads=$(( $(nproc) / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
export THP_MEM_ALLOC_ENABLE=${THP_MEM_ALLOC_ENABLE:-1}
exec "$PYTHON" -m expertmesh.launch.agent --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${RDZV[@]}" \
  --max-restarts="${MAX_RESTARTS:-0}" -m expertmesh.launch.train --config "$CONFIG" "$@"
