#!/usr/bin/env bash
# The one launcher every scripts/cpt/*.sh calls with the trainer's flags:
#
#     exec bash scripts/launch.sh --model_type llama_moe --num_nodes 14 --num_gpu_per_node 8 ...
#
# In an sbatch job: checks num_nodes against --nodes and num_gpu_per_node against --gres (it
# refuses to start, saying what to change, when they differ), runs the pre-flight checklist
# (`megamoe check`), then srun starts one task per node and each runs torchrun
# (--nnodes/--nproc_per_node/--node_rank, rendezvous on the first node of the job at a port
# derived from the job id). Outputs go to outputs/<job-name>-<job-id>/ unless --output_dir is
# given; tensorboard to <output_dir>/runs/<logging-dir>. SIGUSR1 (sbatch --signal=B:USR1@300)
# makes the trainer checkpoint and stop; the job is then requeued and resumes.
# Outside Slurm the same flags run through torchrun on this machine.
#
# The logic is Python (megamoe/ops/launcher.py, unit-tested); this file only finds the interpreter.
# Environment: MEGAMOE_PYTHON (interpreter; default ./.venv/bin/python, else python3),
# MEGAMOE_ALLOW_CPU=1 (no GPUs: run num_gpu_per_node CPU processes per node), MASTER_PORT,
# MEGAMOE_SKIP_CHECK=1, MEGAMOE_NO_REQUEUE=1.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${MEGAMOE_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then
    python=$root/.venv/bin/python
  else
    python=$(command -v python3 || command -v python || true)
  fi
fi
if [ -z "$python" ]; then
  echo "[megamoe.launch] no python found: set MEGAMOE_PYTHON or run 'make setup'" >&2
  exit 2
fi
export MEGAMOE_PYTHON=$python
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -u -m megamoe launch "$@"
