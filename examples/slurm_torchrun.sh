#!/bin/bash
# Data-parallel calibration on several nodes with torchrun (one process per GPU, NCCL).
#
#   mkdir -p logs
#   sbatch --nodes=2 examples/slurm_torchrun.sh --model meta-llama/Llama-3.1-8B --method gptq --num-samples 512
#
# Every rank loads the model, calibrates on its contiguous shard of the calibration samples
# (rank r of W gets samples [r*N/W, (r+1)*N/W)) and all-reduces the statistics each decision
# depends on (GPTQ Hessians with their token counts, activation maxima, AWQ/SmoothQuant search
# losses), so all ranks quantize identically; rank 0 evaluates and writes the checkpoint while the
# others wait. Use a sample count that is a multiple of (nodes x GPUs per node x batch size).
# Check the memory of one rank first: ptqkit estimate --model ... --device cuda:0 --num-samples N/W
#
# The rendezvous is torchrun's c10d backend on the first node of the allocation; torchrun sets
# RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process, and ptqkit starts
# its process group from them (NCCL with --device cuda, gloo on CPUs).
#SBATCH --job-name=ptqkit-dp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/ptqkit-dp-%j.out
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE ))
export TOKENIZERS_PARALLELISM=false

# one torchrun per node (srun starts it on each); torchrun starts one ptqkit process per GPU
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD_NODE:$PORT" \
    -m ptqkit quantize --device cuda --output "ptqkit-out/dp-$SLURM_JOB_ID" "$@"
