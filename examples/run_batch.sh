#!/usr/bin/env bash
# Run a ptqkit batch on one machine without a scheduler.
#
#   examples/run_batch.sh [jobs.yaml]              every job in one process, one after the other
#   PARALLEL=2 examples/run_batch.sh [jobs.yaml]   one process per job (--index), PARALLEL at a time
#
# Exits non-zero if any job failed (its error is in <output dir>.failed.json); rerunning skips the
# finished jobs, so an interrupted batch picks up where it stopped.
set -uo pipefail
JOBS=${1:-examples/jobs.yaml}
PARALLEL=${PARALLEL:-1}
LIST=$(ptqkit batch "$JOBS" --check) || exit 2      # every job validated before anything runs
echo "$LIST"
if [ "$PARALLEL" -le 1 ]; then
  exec ptqkit batch "$JOBS" --summary "${JOBS%.*}.summary.json"
fi
N=$(printf '%s\n' "$LIST" | wc -l)
seq 0 $((N - 1)) | xargs -P "$PARALLEL" -I{} ptqkit batch "$JOBS" --index {}
