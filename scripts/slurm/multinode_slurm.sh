#!/usr/bin/env bash
# A Slurm cluster of several nodes on this one machine, for tests and for trying multi-node jobs:
# each node is a network namespace with its own address, hostname (a UTS namespace) and
# /etc/hosts (a mount namespace), its own slurmd, spool, pid file and log; one slurmctld lives in
# a namespace of its own that also holds the bridge joining the nodes (the "switch") and serves
# as the login node; one munged of our own (own key and socket) authenticates all of them.
# Nothing outside these namespaces is touched: no interface, address, route or firewall rule of
# this machine, no file under /etc (the hosts file is bind-mounted inside the namespaces only).
#
#     scripts/slurm/multinode_slurm.sh start          # root; prints the cluster when it is up
#     scripts/slurm/multinode_slurm.sh login sbatch --nodes=2 --wrap 'srun hostname'
#     scripts/slurm/multinode_slurm.sh login squeue   # any command, on the login node
#     scripts/slurm/multinode_slurm.sh on 2 ps -ef    # a command on node 2 (its namespaces)
#     scripts/slurm/multinode_slurm.sh cut 2          # unplug node 2's cable (mend 2: plug it back)
#     scripts/slurm/multinode_slurm.sh stop           # cancel all jobs, stop everything, remove
#                                                     # the namespaces (logs stay in $DIR/log)
#
#   name        address          what
#   mmctl       10.213.77.1/24   slurmctld, the bridge, the login node (sbatch, scontrol)
#   mmnode<i>   10.213.77.1<i>   slurmd -N mmnode<i>, jobs (i = 1..N)
#
# Environment: MEGAMOE_MN_DIR (/tmp/megamoe-mnslurm: slurm.conf, hosts, munge key and socket,
# spool, state, logs, pids), MEGAMOE_MN_NODES (3), MEGAMOE_MN_NET (10.213.77: a /24 prefix used
# only inside these namespaces), MEGAMOE_MN_PREFIX (mm: names of namespaces and hosts).
# `start` is idempotent (a cluster already up is left alone; leftovers of one that was killed are
# cleaned up first). Needs root, iproute2, util-linux (unshare, nsenter), slurm-wlm and munge
# (scripts/slurm/install_slurm.sh).
set -euo pipefail

DIR=${MEGAMOE_MN_DIR:-/tmp/megamoe-mnslurm}
N=${MEGAMOE_MN_NODES:-3}
NET=${MEGAMOE_MN_NET:-10.213.77}
PFX=${MEGAMOE_MN_PREFIX:-mm}
CTL=${PFX}ctl
CTL_IP=$NET.1
CONF=$DIR/slurm.conf
SOCK=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

# The CPUs this machine gives us: nproc without OMP_NUM_THREADS, which nproc would report instead
node_cpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }
node() { echo "${PFX}node$1"; }
node_ip() { echo "$NET.$((10 + $1))"; }
die() { echo "multinode_slurm.sh: $*" >&2; exit 2; }
holder() { cat "$DIR/run/$1.holder" 2>/dev/null; }     # the process that keeps a node's namespaces
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# a command in a node's (or the login node's) network, UTS and mount namespaces
in_ns() { local h; h=$(holder "$1"); alive "$h" || die "$1 is not running (start first)"
          shift; nsenter -t "$h" -n -u -m --wd="$PWD" -- "$@"; }
login() { in_ns "$CTL" "$@"; }

stop_pids() {  # pidfile...: TERM to all, KILL to those left after 5 s
  local f pid pids=()
  for f in "$@"; do
    pid=$(cat "$f" 2>/dev/null) || continue
    rm -f "$f"
    alive "$pid" && kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 50); do
    local left=0
    for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    [ $left -eq 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

stop() {
  if alive "$(holder "$CTL")" && [ -f "$CONF" ]; then  # no job outlives the cluster
    login scancel --full --quiet --user=root 2>/dev/null || true
    login timeout 20 bash -c 'while squeue -h -t R,CG 2>/dev/null | grep -q .; do sleep 0.5; done' \
      2>/dev/null || true
  fi
  stop_pids "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"
  # whatever a killed node left (job processes) lives in its namespaces: end it by namespace
  local f h p spaces=" "
  for f in "$DIR"/run/*.holder; do
    h=$(cat "$f" 2>/dev/null) || continue
    alive "$h" && spaces+="$(readlink "/proc/$h/ns/uts") "
  done
  if [ "$spaces" != " " ]; then
    for p in /proc/[0-9]*; do
      case "$spaces" in
        *" $(readlink "$p/ns/uts" 2>/dev/null) "*) kill -9 "${p#/proc/}" 2>/dev/null ;;
      esac
    done
  fi
  rm -f "$DIR"/run/*.holder
  stop_pids "$DIR/munge/munged.pid"
  for ns in "$CTL" $(for i in $(seq "$N"); do node "$i"; done); do
    ip netns del "$ns" 2>/dev/null || true
  done
}

up() {  # every node answers and is idle
  [ -f "$CONF" ] && alive "$(holder "$CTL")" || return 1
  local st
  st=$(login sinfo -h -N -o "%N %T" 2>/dev/null) || return 1
  [ "$(echo "$st" | grep -c " idle$")" -eq "$N" ]
}

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (namespaces; slurmd starts jobs as their users)"
  for b in ip unshare nsenter munged slurmctld slurmd sinfo scontrol; do
    command -v $b >/dev/null 2>&1 \
      || die "$b not found (scripts/slurm/install_slurm.sh installs slurm and munge)"
  done
  if up && grep -q "^NodeName=$(node "$N") " "$CONF"; then
    echo "multinode slurm already running: $N nodes; SLURM_CONF=$CONF"
    return 0
  fi
  stop >/dev/null 2>&1 || true   # leftovers of a cluster that was killed
  mkdir -p "$DIR"/{ctld,spool,log,run,munge}
  chmod 755 "$DIR"

  # --- munge: our own daemon, key and socket (shared by every namespace: one machine) ------
  dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" status=none
  chmod 755 "$DIR/munge"   # clients of every user reach the socket; the key stays private
  chmod 400 "$DIR/munge/munge.key"
  local as_munge=() files=(-S "$SOCK" --key-file="$DIR/munge/munge.key"
    --seed-file="$DIR/munge/seed" --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log")
  if id munge >/dev/null 2>&1; then
    chown -R munge: "$DIR/munge"
    as_munge=(runuser -u munge --)
  else
    files+=(--force)
  fi
  "${as_munge[@]}" munged "${files[@]}"
  munge_ok() { munge -S "$SOCK" -n 2>/dev/null | unmunge -S "$SOCK" >/dev/null 2>&1; }
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged does not answer ($DIR/munge/munged.log)"

  # --- names: one hosts file, bind-mounted over /etc/hosts inside each namespace -------------
  {
    echo "127.0.0.1 localhost"
    echo "$CTL_IP $CTL"
    for i in $(seq "$N"); do echo "$(node_ip "$i") $(node "$i")"; done
  } > "$DIR/hosts"

  # --- network: the switch (bridge) in the controller's namespace, a cable to each node ------
  ip netns add "$CTL"
  ip -n "$CTL" link set lo up
  ip -n "$CTL" link add br0 type bridge
  ip -n "$CTL" addr add "$CTL_IP/24" dev br0
  ip -n "$CTL" link set br0 up
  for i in $(seq "$N"); do
    ip netns add "$(node "$i")"
    ip -n "$(node "$i")" link set lo up
    ip -n "$CTL" link add "cable$i" type veth peer name eth0 netns "$(node "$i")"
    ip -n "$CTL" link set "cable$i" master br0 up
    ip -n "$(node "$i")" addr add "$(node_ip "$i")/24" dev eth0
    ip -n "$(node "$i")" link set eth0 up
  done

  # --- hosts: a process per node that holds its hostname and mount namespace ---------------
  for name in "$CTL" $(for i in $(seq "$N"); do node "$i"; done); do
    rm -f "$DIR/run/$name.holder"
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, hiding /sys/fs/cgroup, which
    # slurmd needs
    setsid nsenter --net="/run/netns/$name" unshare --uts --mount --propagation private -- sh -c \
      "hostname $name && mount --bind $DIR/hosts /etc/hosts \
       && echo \$\$ > $DIR/run/$name.holder && exec sleep infinity" </dev/null >/dev/null 2>&1 &
  done
  for name in "$CTL" $(for i in $(seq "$N"); do node "$i"; done); do
    for _ in $(seq 50); do [ -s "$DIR/run/$name.holder" ] && break; sleep 0.1; done
    [ "$(in_ns "$name" hostname)" = "$name" ] || die "namespace $name did not come up"
  done

  # --- slurm.conf ----------------------------------------------------------------------------
  local nodes="$(node 1)"
  [ "$N" -gt 1 ] && nodes="${PFX}node[1-$N]"
  {
    cat <<CONF
# Written by scripts/slurm/multinode_slurm.sh: $N CPU-only nodes, each a network namespace.
ClusterName=megamoe-mn
SlurmctldHost=$CTL($CTL_IP)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
CONF
    for i in $(seq "$N"); do
      echo "NodeName=$(node "$i") NodeAddr=$(node_ip "$i") CPUs=$(node_cpus) RealMemory=2000" \
           "State=UNKNOWN"
    done
    echo "PartitionName=MoE Nodes=$nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$CONF"

  # --- daemons -------------------------------------------------------------------------------
  in_ns "$CTL" slurmctld -c -f "$CONF"   # -c: a fresh cluster, no state of an earlier one
  for i in $(seq "$N"); do
    mkdir -p "$DIR/spool/$(node "$i")"
    in_ns "$(node "$i")" slurmd -f "$CONF" -N "$(node "$i")"
  done
  for _ in $(seq 150); do up && break; sleep 0.2; done
  if ! up; then
    login scontrol update NodeName="$nodes" State=RESUME >/dev/null 2>&1 || true
    sleep 1
  fi
  if ! up; then
    login sinfo -N -l >&2 || true
    tail -n 5 "$DIR"/log/*.log >&2 || true
    die "the nodes did not come up (logs in $DIR/log)"
  fi
  echo "multinode slurm up: $N nodes $nodes ($NET.11.. on bridge br0 in namespace $CTL, login" \
       "node $CTL); SLURM_CONF=$CONF"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  start) start ;;
  stop) stop; echo "multinode slurm stopped" ;;
  status) if up; then login sinfo -N; else echo "not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  login) login "$@" ;;
  on) i=$1; shift; in_ns "$(node "$i")" "$@" ;;
  cut) ip -n "$CTL" link set "cable$1" down ;;
  mend) ip -n "$CTL" link set "cable$1" up ;;
  *) die "usage: multinode_slurm.sh start|stop|status|env|login CMD...|on I CMD...|cut I|mend I" ;;
esac
