#!/usr/bin/env bash
# Stop the daemons started by scripts/slurm/start_local_slurm.sh (by their pid files only;
# munged only if that script started it). Leaves $MEGAMOE_SLURM_DIR (logs) in place.
set -uo pipefail
DIR=${MEGAMOE_SLURM_DIR:-/tmp/megamoe-slurm}
stop_pid() {  # name pidfile
  local pf=$2 pid
  [ -f "$pf" ] || return 0
  pid=$(cat "$pf" 2>/dev/null) || return 0
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || { rm -f "$pf"; return 0; }
  kill "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  rm -f "$pf"
  echo "$1 stopped"
}
export SLURM_CONF=$DIR/slurm.conf
# cancel what is still queued or running so no job outlives the cluster
if [ -f "$SLURM_CONF" ] && command -v scancel >/dev/null 2>&1; then
  scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
fi
stop_pid slurmd "$DIR/run/slurmd.pid"
stop_pid slurmctld "$DIR/run/slurmctld.pid"
if [ -f "$DIR/run/munged.started-by-us" ]; then
  stop_pid munged /run/munge/munged.pid
  rm -f "$DIR/run/munged.started-by-us"
fi
exit 0
