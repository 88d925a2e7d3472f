#!/usr/bin/env bash
# Bring up SLURM on this one machine, as two nodes (node1, node2: two slurmd on 127.0.0.1), for
# the tests of scripts/slurm/ (tests/test_slurm.py). Root, no systemd: Debian's slurm-wlm and
# munge, daemons started by hand, no cgroups. About a minute with the install, seconds after.
#   bash ci/slurm_up.sh        bash ci/slurm_up.sh down
set -euo pipefail
stop_slurm() {
  for p in /run/slurmd-*.pid /run/slurmctld.pid; do
    if [ -f "$p" ]; then kill "$(cat "$p")" 2>/dev/null || true; rm -f "$p"; fi
  done
}
if [ "${1:-}" = down ]; then
  stop_slurm
  [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
  exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
host=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 / 2 - 512 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
for n in node1 node2; do
  grep -qE "^127\.0\.0\.1[[:space:]]+$n\$" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
  mkdir -p "/var/spool/slurmd/$n"
done
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=tp_bench_ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$memory
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$memory
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
# No cgroup.conf: slurmd 22.05 knows no "disabled" cgroup plugin, and nothing here needs one.
rm -f /etc/slurm/cgroup.conf
stop_slurm
sleep 0.5
rm -f /var/spool/slurmctld/clustername    # a fresh controller: -i ignores the saved state
slurmctld -i
slurmd -N node1
slurmd -N node2
for _ in $(seq 100); do
  [ "$(sinfo -h -o '%T %D' 2>/dev/null | awk '$1=="idle"{print $2}')" = 2 ] && exit 0
  sleep 0.2
done
echo "slurm_up: the nodes did not come up (logs in /var/log/slurm/)" >&2
exit 1
