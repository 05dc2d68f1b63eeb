#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the cluster tests (and for trying the grid by
# hand): Debian's slurm-wlm and munge, daemons started directly (no systemd), a minimal
# slurm.conf written for this machine's cores and memory. Needs root.
#
#   bash cluster/slurm_local.sh install    # apt-get install slurm-wlm munge (once)
#   bash cluster/slurm_local.sh start      # write /etc/slurm/slurm.conf, start the daemons
#   bash cluster/slurm_local.sh stop       # stop them
#
# State and logs go to $SLURM_STATE (default /var/tmp/cil-slurm). A slurm.conf that this script
# did not write is never replaced.
set -euo pipefail
STATE=${SLURM_STATE:-/var/tmp/cil-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by cil-unet cluster/slurm_local.sh"

install() {
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        echo "error: $CONF exists and was not written by this script; not replacing it" >&2
        exit 2
    fi
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    # What slurmd measures, less 5% for the system, so the node never reports less than this.
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 95 / 100 ))
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
    cat > "$CONF" <<EOF
$MARKER
ClusterName=cil
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    write_conf
    mkdir -p /run/munge
    chown munge:munge /run/munge 2>/dev/null || true
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
    for _ in $(seq 1 30); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "error: the SLURM node did not become idle; see $STATE/slurmctld.log and slurmd.log" >&2
    exit 1
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
    pkill -x munged || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: bash cluster/slurm_local.sh install|start|stop" >&2; exit 2 ;;
esac
