#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, in a folder of its own, for tests and trying the
# sbatch examples: munged, slurmctld and slurmd on localhost (proctrack/linuxproc, no cgroups,
# every CPU of the machine), all state, logs and sockets under the folder.
#
#   tools/slurm/local_cluster.sh start DIR   # prints the line to eval: export SLURM_CONF=DIR/slurm.conf
#   tools/slurm/local_cluster.sh stop DIR
#
# Needs Debian's slurm-wlm (slurmctld, slurmd, client commands) and munge; runs as root (the
# daemons' user). Ports: 6817/6818 unless SLURMCTLD_PORT / SLURMD_PORT are set.
set -euo pipefail

action=${1:?usage: local_cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: local_cluster.sh start|stop DIR}")

stop() {
    for daemon in slurmd slurmctld munged; do
        if [[ -f "$dir/$daemon.pid" ]]; then
            kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
        fi
    done
    for daemon in slurmd slurmctld munged; do   # wait until each is gone (its port free again)
        if [[ -f "$dir/$daemon.pid" ]]; then
            pid=$(cat "$dir/$daemon.pid")
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            rm -f "$dir/$daemon.pid"
        fi
    done
}

if [[ $action == stop ]]; then
    stop
    exit 0
fi
[[ $action == start ]] || { echo "usage: local_cluster.sh start|stop DIR" >&2; exit 2; }
for tool in munged slurmctld slurmd sbatch srun scontrol; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || {
        echo "local_cluster.sh: $tool not found; apt-get install slurm-wlm munge" >&2; exit 3; }
done
export PATH=$PATH:/usr/sbin
host=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)   # not nproc: it follows OMP_NUM_THREADS
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$dir"/{state,spool,log,munge}
chmod 700 "$dir/munge"

# munge: a fresh key, its own socket (slurm finds it through AuthInfo)
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
       --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

cat > "$dir/slurm.conf" <<CONF
ClusterName=fcmae-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2   # a requeued job starts within seconds
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$dir/slurm.conf

slurmctld -i -f "$SLURM_CONF"      # -i: ignore state left by an earlier cluster in this folder
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do             # up when the node is idle
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "local_cluster.sh: the node did not come up; see $dir/log" >&2
stop
exit 1
