#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying and testing the SLURM profile:
#
#   scripts/slurm/local_cluster.sh install          # Debian/Ubuntu packages slurm-wlm + munge (root, apt)
#   scripts/slurm/local_cluster.sh start [DIR]      # config, keys, logs and pid files in DIR; prints the env
#   scripts/slurm/local_cluster.sh stop [DIR]       # kills the daemons by their pid files, keeps DIR
#
# SLURM's clients find the config at /etc/slurm/slurm.conf, which start links to DIR/slurm.conf (and stop
# removes); it refuses to replace a config that is not its own link. SLURM_CONF alone is not enough: the
# executor plugin's job step (snakemake-executor-plugin-slurm-jobstep 0.6) drops every SLURM_* variable
# before its inner srun, SLURM_CONF included.
#
# Everything lives in DIR (default /tmp/ironcore-slurm): its own munge key and socket, slurmctld and
# slurmd on free ports, no accounting (no slurmdbd: status queries go through squeue, and finished jobs
# stay visible to it for MinJobAge seconds). One partition `debug` with every CPU of the machine and its
# memory less 1 GiB; the node is called localhost and reached on 127.0.0.1 (jobs that look up their node
# list, like torchrun's rendezvous, need no resolvable host name). Daemons run as the calling user (root in
# CI: slurmd starts jobs as their owner).
set -euo pipefail

cmd=${1:-}
dir=$(realpath -m "${2:-/tmp/ironcore-slurm}")
system_conf=/etc/slurm/slurm.conf

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$((seconds * 4))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    echo "local_cluster: $what did not come up within ${seconds}s; logs in $dir" >&2
    return 1
}

case "$cmd" in
install)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null; }
    ;;
start)
    for program in munged slurmctld slurmd sbatch; do
        command -v "$program" >/dev/null || { echo "local_cluster: $program not found (run: $0 install)" >&2; exit 1; }
    done
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        echo "local_cluster: already running in $dir (stop it first)" >&2
        exit 1
    fi
    if [ -e "$system_conf" ] && [ ! -L "$system_conf" ]; then
        echo "local_cluster: $system_conf exists and is not a link made by this script: not replacing it" >&2
        exit 1
    fi
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 700 "$dir/munge"
    [ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$dir/munge/munge.key"
    host=$(hostname -s)
    cpus=$(nproc --all)  # --all: plain nproc honours OMP_NUM_THREADS, and a 1-CPU node never runs a 2-thread job
    memory=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
    user=$(id -un)
    cat >"$dir/slurm.conf" <<CONF
ClusterName=ironcore-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
NodeName=localhost NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    mkdir -p "$(dirname "$system_conf")"
    ln -sfn "$dir/slurm.conf" "$system_conf"
    munged --force --key-file "$dir/munge/munge.key" --socket "$dir/munge/munge.sock" \
        --pid-file "$dir/munge/munged.pid" --log-file "$dir/munge/munged.log" --seed-file "$dir/munge/munge.seed"
    wait_for 10 munged test -S "$dir/munge/munge.sock"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$SLURM_CONF" -N localhost
    wait_for 60 "the node" sh -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
    echo "export SLURM_CONF=$SLURM_CONF"
    ;;
stop)
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    if [ "$(readlink "$system_conf" 2>/dev/null)" = "$dir/slurm.conf" ]; then
        rm -f "$system_conf"
    fi
    ;;
*)
    echo "usage: $0 install | start [DIR] | stop [DIR]" >&2
    exit 2
    ;;
esac
