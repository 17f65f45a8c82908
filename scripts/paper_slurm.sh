#!/bin/bash
# The paper-size run on a SLURM cluster: notebook 01 (the head ranking every later study reads)
# as one job array, its merge, then the other notebooks as arrays after it, then the export.
#   bash scripts/paper_slurm.sh [N_SHARDS]      (from the repository root, after ./dev setup)
set -euo pipefail
N=${1:-16}
PY=.venv/bin/python
submit() {  # submit <dependency or ''> <command>: prints the job id
    sbatch --parsable ${1:+--dependency=afterok:$1} --cpus-per-task=4 --time=12:00:00 "${@:3}" --wrap "$2"
}
rank=$(submit "" "$PY -m fdlib paper run --only 01 --shard \$SLURM_ARRAY_TASK_ID/$N" --array=0-$((N - 1)))
merged=$(submit "$rank" "$PY -m fdlib paper merge --only 01 && $PY -m fdlib paper export --only 01")
# notebook 07 chooses each method's setting on all its train questions before it decodes a test
# question, so it runs as one job
jobs=("$(submit "$merged" "$PY -m fdlib paper run --only 07")")
for nb in 02 03 04 05; do
    arr=$(submit "$merged" "$PY -m fdlib paper run --only $nb --shard \$SLURM_ARRAY_TASK_ID/$N" --array=0-$((N - 1)))
    jobs+=("$(submit "$arr" "$PY -m fdlib paper merge --only $nb && $PY -m fdlib paper run --only $nb")")
done
# the last `run` of each notebook finds every row stored, renders its figures and exports;
# then the gallery, once all are done:
submit "$(IFS=:; echo "${jobs[*]}")" "$PY -m fdlib reproduce --size paper"
