#!/bin/bash
# A one-node Slurm on this machine, for tests/test_slurm.py (`make slurm-test`) and for trying the
# sbatch scripts as a cluster user would. Needs root and Debian's packages (installed when missing).
#
#   scripts/slurm/local_cluster.sh start    # install what is missing, write the config, start munged,
#                                           # slurmctld and slurmd, wait until the node is idle
#   scripts/slurm/local_cluster.sh status   # sinfo and squeue
#   scripts/slurm/local_cluster.sh stop     # cancel every job, stop the daemons
#
# The cluster: one node (this host, all its CPUs, no GPUs) in one partition `local`, the controller
# and the node daemon as root, processes tracked by their parent PIDs (proctrack/linuxproc, no
# cgroups needed) and no task binding. Its state and logs are in $SLURM_LOCAL_DIR
# (default /var/lib/sdd_train_slurm); the config is /etc/slurm/slurm.conf, which this script refuses
# to overwrite unless it wrote it.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/var/lib/sdd_train_slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by sdd_train scripts/slurm/local_cluster.sh"
HOST=$(hostname -s)

die() { echo "local_cluster: $*" >&2; exit 2; }

install_missing() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "installing ${missing[*]} needs root (apt-get)"
    echo "local_cluster: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away to run a local test cluster"
    fi
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    # slurmd -C prints this machine's NodeName line (CPUs, sockets, cores, threads, memory).
    local node
    node=$(slurmd -C | grep '^NodeName=' | sed -e "s/^NodeName=[^ ]*/NodeName=$HOST NodeAddr=127.0.0.1/")
    cat >"$CONF" <<EOF
$MARK
ClusterName=sddlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A requeued job may start again at once, and a test's time limits act within seconds.
SchedulerParameters=defer_batch,sched_interval=2
KillWait=30
MinJobAge=3600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobCompType=jobcomp/none
$node State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || \
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
}

wait_idle() {
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
        case "$state" in
            idle|mixed|allocated) echo "local_cluster: node $HOST is $state"; return ;;
            down*|drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node $HOST did not become idle in 60 s (state '$state'); see $STATE/log/"
}

start() {
    [ "$(id -u)" -eq 0 ] || die "start needs root (it installs packages and runs the daemons as root)"
    install_missing
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    wait_idle
}

stop() {
    if command -v scancel >/dev/null && pgrep -x slurmctld >/dev/null; then
        scancel --full --quiet --user=root 2>/dev/null || true
        for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
    fi
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.5; done
    echo "local_cluster: stopped (munged left running; state and logs in $STATE)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
