#!/usr/bin/env bash
# A real one-node SLURM cluster on this host, for tests and for trying slurm/*.sbatch locally:
# munged, slurmctld and slurmd run as root with every file (config, key, state, logs, pids) in
# $SLURM_CLUSTER_DIR (default /tmp/llama-horovod-slurm), on non-default ports, so nothing in
# /etc is touched and a site's own SLURM, if any, is left alone.
#
#   scripts/slurm_cluster.sh start        # apt-get installs slurm-wlm and munge if missing
#   export SLURM_CONF=/tmp/llama-horovod-slurm/slurm.conf   # start prints this line
#   sbatch --wrap hostname; squeue
#   scripts/slurm_cluster.sh status | stop
#
# Knobs: SLURM_CLUSTER_DIR, SLURMCTLD_PORT (16817), SLURMD_PORT (16818), SLURM_CPUS (nproc),
# START_TIMEOUT_S (60).
set -euo pipefail
# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: [SLURM_CLUSTER_DIR=DIR] $0 start|stop|status"
SLURM_CLUSTER_DIR=${SLURM_CLUSTER_DIR:-/tmp/llama-horovod-slurm}
[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd starts jobs as any user)"
DIR=$(mkdir -p "$SLURM_CLUSTER_DIR" && cd "$SLURM_CLUSTER_DIR" && pwd)
export SLURM_CONF=$DIR/slurm.conf
CTLD_PORT=${SLURMCTLD_PORT:-16817}
SLURMD_PORT=${SLURMD_PORT:-16818}
CPUS=${SLURM_CPUS:-$(nproc)}
NODE=$(hostname -s)

install_packages() {
    apt_install_missing slurm_cluster slurm-wlm munge
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log,munge}
    chmod 755 "$DIR/munge"  # the socket is for every user's srun; the key file itself is 0600
    # munged refuses a key readable by others; 1 KiB of randomness is what mungekey makes.
    [ -f "$DIR/munge/munge.key" ] || (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm_cluster.sh: one node ($NODE), everything under $DIR.
ClusterName=lhtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# A job this one node can never run (more nodes or CPUs than it has) is refused when
# submitted, with the reason, instead of pending forever with reason PartitionConfig.
EnforcePartLimits=ALL
# Look at pending jobs every 2 s, not 60: a requeued job becomes eligible with no event to
# wake the scheduler.
SchedulerParameters=sched_interval=2
ReturnToService=2
# Short timers: tests wait on job state changes.
KillWait=5
MinJobAge=600
InactiveLimit=0
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_of() { [ -f "$DIR/$1.pid" ] && cat "$DIR/$1.pid"; }
running() { local pid; pid=$(pid_of "$1") && kill -0 "$pid" 2>/dev/null; }

show_logs() {
    for log in "$DIR"/log/*.log; do
        echo "--- $log (last 40 lines)" >&2
        tail -n 40 "$log" >&2
    done
}

wait_until() {  # wait_until DESCRIPTION COMMAND...: poll for START_TIMEOUT_S, then fail with the logs
    local what=$1 deadline=$((SECONDS + ${START_TIMEOUT_S:-60}))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            show_logs
            die "timed out waiting for $what"
        fi
        sleep 0.5
    done
}

node_idle() { [ "$(sinfo -h -n "$NODE" -o %T)" = idle ]; }

start() {
    install_packages
    if running slurmctld; then
        echo "[slurm_cluster] already running ($SLURM_CONF)"
        return
    fi
    # A start that fails half-way stops what it started.
    trap 'stop >/dev/null 2>&1' EXIT
    write_config
    running munged || munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" \
        || { show_logs; die "munged did not start"; }
    # -i: ignore state from a previous cluster in this dir; daemons fork and write their pid files.
    slurmctld -i -f "$SLURM_CONF" || { show_logs; die "slurmctld did not start"; }
    slurmd -f "$SLURM_CONF" -N "$NODE" || { show_logs; die "slurmd did not start"; }
    wait_until "slurmctld to answer" scontrol ping
    wait_until "node $NODE to become idle" node_idle
    trap - EXIT
    echo "[slurm_cluster] up: export SLURM_CONF=$SLURM_CONF"
}

stop() {
    # Cancel the jobs and wait for them to end while slurmd is still there to kill them:
    # without it their slurmstepd and ranks would outlive the cluster.
    if running slurmctld && running slurmd; then
        scancel --user=root 2>/dev/null || true
        for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    for daemon in slurmd slurmctld munged; do
        running "$daemon" || continue
        local pid
        pid=$(pid_of "$daemon")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        rm -f "$DIR/$daemon.pid"
    done
    echo "[slurm_cluster] stopped"
}

status() {
    local down=0
    for daemon in munged slurmctld slurmd; do
        if running "$daemon"; then echo "$daemon: running (pid $(pid_of "$daemon"))"; else echo "$daemon: stopped"; down=1; fi
    done
    ((down)) || sinfo
    return "$down"
}

case $1 in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "unknown command '$1' (start|stop|status)" ;;
esac
