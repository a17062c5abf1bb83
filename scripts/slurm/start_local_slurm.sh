#!/usr/bin/env bash
# Start a one-machine Slurm cluster (munged, slurmctld, slurmd) for tests and for trying the
# sbatch scripts on a workstation. This machine is the controller and the only compute node,
# CPU-only (no gres), in one partition "MoE" (the training guide's partition name).
#
# Idempotent: daemons already answering are left alone. Everything Slurm writes lives under
# $MEGAMOE_SLURM_DIR (default /tmp/megamoe-slurm): slurm.conf, spool/state dirs, logs, pids.
# Nothing under /etc/slurm is touched; clients find the cluster through SLURM_CONF:
#
#     eval "$(scripts/slurm/start_local_slurm.sh --env)"   # or: export SLURM_CONF=$MEGAMOE_SLURM_DIR/slurm.conf
#     sbatch --wrap hostname
#     scripts/slurm/stop_local_slurm.sh
#
# Needs root (slurmd runs jobs as their submitting user) and slurm + munge installed
# (scripts/slurm/install_slurm.sh). Ports: MEGAMOE_SLURMCTLD_PORT (6817), MEGAMOE_SLURMD_PORT (6818).
set -euo pipefail

print_env=0
[ "${1:-}" = "--env" ] && print_env=1
log() { if [ $print_env -eq 1 ]; then echo "$*" >&2; else echo "$*"; fi; }

DIR=${MEGAMOE_SLURM_DIR:-/tmp/megamoe-slurm}
CTLD_PORT=${MEGAMOE_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${MEGAMOE_SLURMD_PORT:-6818}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
export SLURM_CONF=$CONF

if [ "$(id -u)" -ne 0 ]; then
  echo "start_local_slurm.sh: must run as root (slurmd starts jobs as their users)" >&2
  exit 2
fi
for b in munged munge slurmctld slurmd sinfo scontrol; do
  command -v $b >/dev/null 2>&1 || { echo "start_local_slurm.sh: $b not found; run scripts/slurm/install_slurm.sh" >&2; exit 2; }
done

mkdir -p "$DIR"/{ctld,slurmd,log,run}
chmod 755 "$DIR"

# --- munge -----------------------------------------------------------------------------------
# The CPUs this machine gives us: nproc without OMP_NUM_THREADS, which nproc would report instead
node_cpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key --force >/dev/null
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
  chmod 755 /run/munge
  rm -f /run/munge/munge.socket.2.lock
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- munged
  else
    munged --force
  fi
  touch "$DIR/run/munged.started-by-us"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || { echo "start_local_slurm.sh: munged does not answer (see /var/log/munge/munged.log)" >&2; exit 1; }
  log "munged started"
fi

# --- slurm.conf ------------------------------------------------------------------------------
cpus=$(node_cpus)
avail_mb=$(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo)
real_mb=$(( avail_mb * 8 / 10 ))
[ "$real_mb" -lt 1 ] && real_mb=1
new_conf=$(cat <<CONF
# Written by scripts/slurm/start_local_slurm.sh: one CPU-only node, for tests.
ClusterName=megamoe-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=MoE Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)

ctld_ok() { scontrol ping 2>/dev/null | grep -q "is UP"; }
node_ok() { sinfo -h -N -o "%T" 2>/dev/null | grep -qvE "down|drain|unknown|not_responding|fail" ; }

# Already up with our configuration: nothing to do (the memory figure may differ from a fresh
# computation; a running cluster keeps the conf it started with).
if [ -f "$CONF" ] && grep -q "^ClusterName=megamoe-local" "$CONF" && ctld_ok && node_ok; then
  log "slurm already running (SLURM_CONF=$CONF)"
  [ $print_env -eq 1 ] && echo "export SLURM_CONF=$CONF"
  exit 0
fi
if ! { [ -f "$CONF" ] && ctld_ok; }; then
  echo "$new_conf" > "$CONF"
fi

# --- daemons ---------------------------------------------------------------------------------
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! ctld_ok; then
  pid_alive "$DIR/run/slurmctld.pid" && kill "$(cat "$DIR/run/slurmctld.pid")" && sleep 1
  slurmctld -f "$CONF"   # clean start is fine (-c would drop saved jobs; not needed)
  for _ in $(seq 100); do ctld_ok && break; sleep 0.1; done
  ctld_ok || { tail -n 20 "$DIR/log/slurmctld.log" >&2; echo "slurmctld did not come up" >&2; exit 1; }
  log "slurmctld started"
fi
if ! pid_alive "$DIR/run/slurmd.pid"; then
  mkdir -p "$DIR/slurmd/$NODE"
  slurmd -f "$CONF" -N "$NODE"
  log "slurmd started"
fi
for _ in $(seq 150); do node_ok && break; sleep 0.2; done
if ! node_ok; then
  scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  sleep 1
fi
if ! node_ok; then
  sinfo -N -l >&2 || true
  tail -n 20 "$DIR/log/slurmd.log" >&2 || true
  echo "start_local_slurm.sh: node $NODE is not up" >&2
  exit 1
fi
log "slurm up: node $NODE ($cpus CPUs, ${real_mb} MB), partition MoE; SLURM_CONF=$CONF"
[ $print_env -eq 1 ] && echo "export SLURM_CONF=$CONF"
exit 0
