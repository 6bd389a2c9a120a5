#!/usr/bin/env bash
# Launch a haina command under torchrun on this node.
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: the multi-node rendezvous (defaults: one node)
#   NPROC_PER_NODE: processes on this node (default 1)
# Example: NPROC_PER_NODE=1 launchers/torchrun.sh pretrain --config demo train.run_dir=runs/x
set -euo pipefail
exec torchrun \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC_PER_NODE:-1}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m haina.tools.cli "$@"
