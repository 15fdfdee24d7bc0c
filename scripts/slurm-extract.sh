#!/usr/bin/env bash
# Extract one adapter with N Slurm array tasks, then join the parts.
#
#   sbatch --array=1-8 scripts/slurm-extract.sh BASE FT OUT [extract options...]
#   # when all tasks are done (or as a dependent job: --dependency=afterok:<jobid>):
#   phlora combine OUT/part-* --out OUT/adapter
#
# Each task computes its share (balanced by bytes read) into OUT/part-I; a task that was
# preempted or killed picks up where it stopped when resubmitted (--resume). The combined
# adapter is byte for byte what one process would have written. A task started while another
# still runs on its part (a requeue racing the old task) is refused: each part is locked.
#SBATCH --job-name=phlora-extract
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
set -euo pipefail

base=${1:?usage: sbatch --array=1-N $0 BASE FT OUT [extract options...]}
ft=${2:?missing FT}
out=${3:?missing OUT}
shift 3
i=${SLURM_ARRAY_TASK_ID:?run as a Slurm array job: sbatch --array=1-N}
n=${SLURM_ARRAY_TASK_COUNT:?run as a Slurm array job}
part="$out/part-$i"

resume=()
if [ -d "$part/.phlora-journal" ]; then
    resume=(--resume)  # a requeued task continues from its journal
fi
exec phlora extract --base "$base" --ft "$ft" --out "$part" --shard "$i/$n" "${resume[@]}" "$@"
