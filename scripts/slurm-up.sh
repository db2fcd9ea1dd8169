#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for loopstack's launcher tests and for trying
# `loopstack launch slurm` by hand. Debian/Ubuntu, run as root. Idempotent: when the controller
# answers and this node is up, it does nothing.
#
#   scripts/slurm-up.sh            # install (apt) if needed, configure, start munged/slurmctld/slurmd
#   scripts/slurm-up.sh --down     # stop the three daemons again
#
# What it sets up (written to /etc/slurm/slurm.conf, marked as ours; an existing slurm.conf that
# this script did not write is never overwritten):
#   * one node named `hostname -s` with this machine's CPUs and a bit less than its memory;
#   * SlurmUser=root, munge authentication (key created when missing);
#   * proctrack/linuxproc + task/none: no cgroups needed, works in containers;
#   * AuthInfo=cred_expire=10 and bf_interval=1,sched_interval=2, so a requeued job restarts in
#     ~12 s instead of ~130 s (a requeued job waits cred_expire seconds; 5 is the lowest accepted).
# State and logs live under /var/spool/loopstack-slurm and /var/log/slurm/loopstack-*.log.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by loopstack scripts/slurm-up.sh"
STATE=/var/spool/loopstack-slurm
LOGS=/var/log/slurm
NODE=$(hostname -s)

log() { echo "slurm-up: $*" >&2; }
die() { log "error: $*"; exit 1; }

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }

is_up() {
    command -v scontrol >/dev/null 2>&1 || return 1
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    case "$(node_state)" in idle* | mixed* | allocated* | completing*) return 0 ;; *) return 1 ;; esac
}

stop_daemons() {
    local name
    for name in slurmd slurmctld; do
        if [ -f "/run/$name.pid" ] && kill -0 "$(cat "/run/$name.pid")" 2>/dev/null; then
            kill "$(cat "/run/$name.pid")" 2>/dev/null || true
        fi
    done
    sleep 1
}

if [ "${1:-}" = "--down" ]; then
    stop_daemons
    log "stopped slurmd and slurmctld (munged left running)"
    exit 0
fi

if is_up; then
    log "already up: node $NODE is $(node_state)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && exec sudo -n "$0" "$@"
    die "must run as root (it installs packages and starts daemons)"
fi

# --- packages ------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; }
fi

# --- slurm.conf ----------------------------------------------------------------------------------
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
fi
# `slurmd -C` prints this machine's node line (CPUs, sockets, cores, threads, RealMemory in MB).
HW=$(slurmd -C | head -n 1)
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$((MEM * 95 / 100))  # a bit under the machine's, so slurmd does not drain the node
TOPO=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$HW")

mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
NEW_CONF=$(cat <<EOF
$MARK
# Single-node test cluster for loopstack (launch/README.md). Re-running the script rewrites it.
ClusterName=loopstack
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds before they can start again (default 120).
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# No cgroups: track processes by parent pid, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# Keep finished jobs visible to squeue/scontrol for 10 minutes (no accounting database here).
MinJobAge=600
KillWait=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/loopstack-slurmctld.log
SlurmdLogFile=$LOGS/loopstack-slurmd.log
NodeName=$NODE CPUs=$CPUS $TOPO RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ "$(cat "$CONF" 2>/dev/null || true)" != "$NEW_CONF" ]; then
    printf '%s\n' "$NEW_CONF" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    log "wrote $CONF ($NODE: $CPUS CPUs, ${MEM} MB)"
fi

# --- munge ---------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
fi

# --- slurmctld -----------------------------------------------------------------------------------
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
running() { [ -f "/run/$1.pid" ] && kill -0 "$(cat "/run/$1.pid")" 2>/dev/null; }
wait_ctld() {  # until it answers, or its process is gone (a fatal error at start-up)
    for _ in $(seq 100); do
        ctld_up && return 0
        sleep 0.2
        running slurmctld || { sleep 0.5; ctld_up; return; }
    done
    return 1
}

if ! ctld_up; then
    if running slurmctld; then kill "$(cat /run/slurmctld.pid)"; sleep 1; fi
    # A state directory written under another ClusterName is refused: it cannot be ours, start clean.
    if [ -f "$STATE/ctld/clustername" ] && [ "$(cat "$STATE/ctld/clustername")" != loopstack ]; then
        rm -rf "${STATE:?}/ctld" && mkdir -p "$STATE/ctld"
    fi
    rm -f /run/slurmctld.pid
    slurmctld
    if ! wait_ctld; then
        # After an unclean stop the saved job state can keep slurmctld from starting: clear it (-c).
        log "slurmctld did not come up; restarting it with -c (clears saved job state)"
        running slurmctld && kill "$(cat /run/slurmctld.pid)" && sleep 1
        slurmctld -c
        if ! wait_ctld; then
            # State files it cannot even read (e.g. truncated by a crash): keep them aside, start empty.
            running slurmctld && kill "$(cat /run/slurmctld.pid)" && sleep 1
            aside="$STATE/ctld.broken-$(date +%s)"
            log "slurmctld still down; moving its state to $aside and starting empty"
            mv "$STATE/ctld" "$aside" && mkdir -p "$STATE/ctld"
            slurmctld -c
            wait_ctld || die "slurmctld did not start (see $LOGS/loopstack-slurmctld.log)"
        fi
    fi
fi

# --- slurmd --------------------------------------------------------------------------------------
if ! running slurmd; then
    slurmd
fi
for _ in $(seq 100); do
    state=$(node_state)
    case "$state" in
        idle* | mixed* | allocated* | completing*) break ;;
        down* | drain* | fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
done
is_up || die "node $NODE is '$(node_state)', not idle (see $LOGS/loopstack-slurmd.log; sinfo -R)"
log "up: node $NODE is $(node_state) (slurm $(sinfo -V | awk '{print $2}'))"
