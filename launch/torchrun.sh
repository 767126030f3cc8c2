#!/usr/bin/env bash
# qat-train on several processes with torchrun: one node, or several nodes with the usual rendezvous
# variables. Arguments are qat-train's Hydra overrides.
#
#   launch/torchrun.sh recipe=smollm2_w4_lsq                                   # one node, one process per GPU
#   NPROC_PER_NODE=2 TRAINER=ddp_cpu launch/torchrun.sh recipe=smollm2_w4_lsq  # two CPU processes (gloo)
#   TRAINER=fsdp launch/torchrun.sh recipe=smollm2_w4_lsq                      # sharded (FSDP2)
#   # two nodes: the same command on each, NODE_RANK=0 on the node at MASTER_ADDR, 1 on the other
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 RUN_DIR=/shared/qat/run1 launch/torchrun.sh recipe=...
#
# Environment (defaults in brackets): NPROC_PER_NODE [visible GPUs, else 1], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], TRAINER [ddp; ddp_cpu, fsdp], PYTHON [python],
# RUN_DIR [outputs/torchrun/<date_time>; required with several nodes: one path on a shared file system].
#
# The run directory is fixed here, once, and passed to every rank (hydra.run.dir); only rank 0 writes
# metrics.json and the export. Each rank logs to RUN_DIR/train_rank<RANK>.log. Before torchrun starts,
# `python -m qat.distributed` composes the same configuration and refuses more processes than devices.
set -euo pipefail

PYTHON=${PYTHON:-python}
TRAINER=${TRAINER:-ddp}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
if [[ "$NNODES" -gt 1 && -z "${RUN_DIR:-}" ]]; then
  echo "launch/torchrun.sh: error: NNODES=$NNODES: set RUN_DIR to one path on a shared file system (every node writes there)" >&2
  exit 2
fi
RUN_DIR=${RUN_DIR:-outputs/torchrun/$(date +%Y-%m-%d_%H-%M-%S)}

# the caller's overrides win over TRAINER; the process layout and the run directory are fixed here
ARGS=("trainer=$TRAINER" "$@" "trainer.devices=$NPROC_PER_NODE" "trainer.num_nodes=$NNODES" "hydra.run.dir=$RUN_DIR")
"$PYTHON" -m qat.distributed --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" -- "${ARGS[@]}"

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m qat.train "${ARGS[@]}" 'hydra.job.name=train_rank${oc.env:RANK}'
