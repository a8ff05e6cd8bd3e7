#!/bin/bash
# Spread a ptqkit batch over a SLURM cluster: one array task per job.
#
#   N=$(ptqkit batch examples/jobs.yaml --check | wc -l)     # validates every job (no model loads)
#   mkdir -p logs                                            # SLURM does not create the --output directory
#   sbatch --array=0-$((N - 1)) examples/slurm_array.sh examples/jobs.yaml
#
# Each task runs job $SLURM_ARRAY_TASK_ID (0-based, in file order). Outputs are written atomically, so a
# task that is pre-empted or killed leaves no half-written directory: resubmit the array and the finished
# jobs are skipped. A failed job leaves <output dir>.failed.json with its error and traceback.
#SBATCH --job-name=ptqkit
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --gres=gpu:1
#SBATCH --time=02:00:00
#SBATCH --output=logs/ptqkit-%A_%a.out
set -euo pipefail
JOBS=${1:-examples/jobs.yaml}
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-N (see the top of this file)}"
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8} TOKENIZERS_PARALLELISM=false
exec ptqkit batch "$JOBS" --index "$SLURM_ARRAY_TASK_ID" --summary "logs/summary-${SLURM_ARRAY_JOB_ID:-0}-${SLURM_ARRAY_TASK_ID}.json"
