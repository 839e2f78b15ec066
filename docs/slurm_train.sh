#!/bin/bash
# One node, all its GPUs, requeued at the time limit until the run has finished.
#SBATCH --job-name=cdne-mu-nwpu-64
#SBATCH --nodes=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=cdne-%j.out
# --signal=B:USR1@300: Slurm sends SIGUSR1 to this script 5 minutes before the time limit.
# --requeue lets `scontrol requeue` put the job back in the queue; --open-mode=append keeps
# one log across the restarts.

cd "$SLURM_SUBMIT_DIR" || exit 1
source .venv/bin/activate

# --name fixes the run folder; --resume auto continues it when it holds a checkpoint and
# starts it otherwise, so every restart runs this same line.
python -m utils.launch --standalone --nproc_per_node="${SLURM_GPUS_ON_NODE:-1}" \
    train/main.py --dataset NWPU-RESISC45 --dim 64 --num_workers 8 --name mu_nwpu_64 --resume auto &
run=$!

# The warning goes on to the training processes: they finish the step, save a checkpoint
# and exit with 138 (128 + SIGUSR1).
trap 'echo "time limit ahead: saving a checkpoint"; kill -USR1 "$run"' USR1
wait "$run"                                      # returns early when the trap runs...
while kill -0 "$run" 2>/dev/null; do wait "$run"; done
wait "$run"; status=$?                           # ...so read the run's own exit status here
if [ "$status" -eq 138 ]; then
    echo "requeueing job $SLURM_JOB_ID; the run continues from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
