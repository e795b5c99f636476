#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for checking the sbatch scripts for real.
#   sudo apt-get install -y slurm-wlm munge        # once
#   eval "$(bash tests/slurm/local_cluster.sh start /tmp/slurm)"   # prints: export SLURM_CONF=...
#   sbatch ...; squeue; sacct is not configured (scontrol show job keeps finished jobs for MinJobAge seconds)
#   bash tests/slurm/local_cluster.sh stop /tmp/slurm
# Runs the daemons as root (SlurmUser=root), no cgroups (proctrack/linuxproc), every CPU of this machine, no GPUs.
set -euo pipefail
cmd="${1:?start|stop}"
dir="$(realpath -m "${2:-/tmp/vssl_slurm}")"
conf="$dir/slurm.conf"
if [[ "$cmd" == stop ]]; then
    for f in "$dir"/slurmctld.pid "$dir"/slurmd.pid; do
        [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null || true
    done
    sleep 1
    exit 0
fi
for bin in slurmctld slurmd munged sbatch; do
    command -v "$bin" >/dev/null || { echo "$bin not found: apt-get install -y slurm-wlm munge" >&2; exit 1; }
done
mkdir -p "$dir"/{state,spool,log}
host="$(hostname -s)"
cpus="$(getconf _NPROCESSORS_ONLN)"  # (nproc follows OMP_NUM_THREADS)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$conf" <<CONF
ClusterName=vssl_local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=60
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
if ! pgrep -x munged >/dev/null; then
    [[ -s /etc/munge/munge.key ]] || mungekey --create --force
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
fi
export SLURM_CONF="$conf"
slurmctld -f "$conf"
slurmd -f "$conf"
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "export SLURM_CONF=$conf"
        exit 0
    fi
    sleep 1
done
echo "the local SLURM did not come up; see $dir/log/" >&2
exit 1
