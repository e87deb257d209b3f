#!/usr/bin/env bash
# A real single-node Slurm (munge + slurmctld + slurmd) on this machine, for the sweep's integration tests.
#   scripts/local-slurm.sh install   apt-get install slurm-wlm munge (Debian), if missing
#   scripts/local-slurm.sh start     start the daemons (idempotent); prints the SLURM_CONF to export
#   scripts/local-slurm.sh status    exit 0 when the node is up and idle/allocated
#   scripts/local-slurm.sh stop      cancel its jobs, stop what `start` started, by pid files (idempotent)
# Needs root. Everything (config, munge key and socket, spool, logs, pid files) lives in $CLUE_ADV_SLURM_DIR
# (default /tmp/clue-adv-slurm); nothing under /etc is touched: clients find the config through SLURM_CONF,
# and the config names this cluster's own munge socket. Several such clusters can run side by side (one per
# state dir) when each gets its own ports: $CLUE_ADV_SLURM_PORT (slurmctld; slurmd uses the next one).
# Recipe checked on these machines: ../shared/SLURM.md (Slurm 22.05 from Debian).
set -euo pipefail
STATE=${CLUE_ADV_SLURM_DIR:-/tmp/clue-adv-slurm}
CONF=$STATE/slurm.conf
PORT=${CLUE_ADV_SLURM_PORT:-6817}
MUNGE_SOCKET=$STATE/munge/munge.socket
export SLURM_CONF=$CONF
HOST=$(hostname -s)

die() { echo "local-slurm: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root (munged and slurmd run as root here)"; }
have_binaries() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
                  && command -v sbatch >/dev/null; }
# (read once: a daemon removes its pid file as it exits)
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }
munge_ok() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

node_up() {
  local state
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1) || return 1
  case "$state" in idle*|mix*|alloc*|completing*) return 0 ;; *) return 1 ;; esac
}

install() {
  need_root
  have_binaries && { echo "slurm and munge already installed"; return 0; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
}

# This cluster's own munged (key, socket, seed, log in the state dir): the machine's munge, if any, is left
# alone, and stopping one cluster cannot break another's authentication.
start_munge() {
  alive "$STATE/munged.pid" && munge_ok && return 0
  mkdir -p "$STATE/munge"
  chmod 700 "$STATE/munge"
  if [ ! -s "$STATE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
  fi
  # as root munged refuses to start without --force
  munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munged.pid" \
    --seed-file="$STATE/munge/munged.seed" --log-file="$STATE/log/munged.log" 2>>"$STATE/log/munged.err" \
    || die "munged failed to start (see $STATE/log/munged.err)"
  for _ in $(seq 20); do munge_ok && return 0; sleep 0.5; done
  die "munge does not answer (see $STATE/log/munged.log)"
}

# The node's memory in MB, less a margin for the daemons, so that a job's --mem is checked against the real
# machine (a RealMemory above what the node has would put it in state DRAIN).
real_memory_mb() {
  local kb
  kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null || true)
  if [ -n "$kb" ]; then echo $(( kb / 1024 * 9 / 10 )); else echo 2000; fi
}

write_conf() {
  mkdir -p "$STATE"/{state,spool,log}
  cat >"$CONF" <<CONF
ClusterName=clueadv
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
MpiDefault=none
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# scancel: SIGTERM, then SIGKILL this many seconds later (30 by default). submitit's jobs ignore SIGTERM, so a
# cancelled run trains on until the SIGKILL: here it stops about 5 s after scancel.
KillWait=2
NodeName=$HOST CPUs=$(nproc) RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  need_root
  have_binaries || die "slurm-wlm/munge not installed (run: $0 install)"
  if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && node_up; then
    echo "already running"; echo "export SLURM_CONF=$CONF"; return 0
  fi
  mkdir -p "$STATE/log"
  start_munge
  write_conf
  alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld failed (see $STATE/log/slurmctld.log)"
  alive "$STATE/slurmd.pid" || slurmd -f "$CONF" || die "slurmd failed (see $STATE/log/slurmd.log)"
  for _ in $(seq "${CLUE_ADV_SLURM_WAIT:-60}"); do
    if node_up; then echo "slurm is up: node $HOST"; echo "export SLURM_CONF=$CONF"; return 0; fi
    # a node left DOWN by an earlier unclean stop comes back with ReturnToService=2, or by hand:
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  die "the node did not come up (see $STATE/log/)"
}

# SIGTERM the named daemons (by their pid files), wait up to 5 s, then SIGKILL what is left.
terminate() {
  local name pid pids=()
  for name in "$@"; do
    pid=$(cat "$STATE/$name.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; pids+=("$pid"); fi
  done
  for _ in $(seq 20); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.25
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for name in "$@"; do rm -f "$STATE/$name.pid"; done
}

stop() {
  # Jobs first: their processes belong to slurmstepd, which outlives slurmd.
  if alive "$STATE/slurmctld.pid"; then
    scancel --user "$(id -un)" >/dev/null 2>&1 || true
    for _ in $(seq 20); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  # Both Slurm daemons at once (each takes a couple of seconds to save its state), munge after them.
  terminate slurmd slurmctld
  terminate munged
  echo "stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) node_up ;;
  *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
