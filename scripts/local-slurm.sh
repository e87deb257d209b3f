#!/usr/bin/env bash
# A real single-node Slurm (munge + slurmctld + slurmd) on this machine, for the sweep's integration tests.
#   scripts/local-slurm.sh install   apt-get install slurm-wlm munge (Debian), if missing
#   scripts/local-slurm.sh start     start the daemons (idempotent); prints the SLURM_CONF to export
#   scripts/local-slurm.sh status    exit 0 when the node is up and idle/allocated
#   scripts/local-slurm.sh stop      stop what `start` started, by pid files (idempotent)
# Needs root. State (config, spool, logs, pid files) lives in $CLUE_ADV_SLURM_DIR (default /tmp/clue-adv-slurm);
# nothing under /etc/slurm is touched: clients find the config through SLURM_CONF.
# Recipe checked on these machines: ../shared/SLURM.md (Slurm 22.05 from Debian).
set -euo pipefail
STATE=${CLUE_ADV_SLURM_DIR:-/tmp/clue-adv-slurm}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF
HOST=$(hostname -s)

die() { echo "local-slurm: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root (munged and slurmd run as root here)"; }
have_binaries() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
                  && command -v sbatch >/dev/null; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

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

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  # as root munged refuses to start without --force; it then warns about log ownership (harmless)
  munged --force --pid-file "$STATE/munged.pid" 2>>"$STATE/log/munged.err" || die "munged failed to start"
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "munge does not answer (see $STATE/log/munged.err)"
}

write_conf() {
  mkdir -p "$STATE"/{state,spool,log}
  cat >"$CONF" <<CONF
ClusterName=clueadv
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
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
NodeName=$HOST CPUs=$(nproc) RealMemory=2000 State=UNKNOWN
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

stop() {
  for name in slurmd slurmctld munged; do
    local pidfile=$STATE/$name.pid
    if alive "$pidfile"; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      for _ in $(seq 20); do alive "$pidfile" || break; sleep 0.25; done
      alive "$pidfile" && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  echo "stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) node_up ;;
  *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
