#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, no systemd (Debian's slurmctld, slurmd, munge).
# Used by tests/launch (and by hand to try the sbatch scripts in slurm/ on a laptop or CI box).
#
#   bash tools/slurm_local.sh up   STATE_DIR    # install packages if missing, start munged/slurmctld/slurmd
#   bash tools/slurm_local.sh down STATE_DIR    # stop exactly the daemons `up` started (pidfiles), cancel jobs
#
# Prints `export SLURM_CONF=STATE_DIR/etc/slurm.conf` on success; every path (config, state,
# spool, logs) lives under STATE_DIR. Needs root (daemons, apt-get); exit code 3 = cannot run here.
# Why proctrack/cgroup: with linuxproc, scancel of a job running `ray start --block` leaked raylet
# and friends (re-parented to PID 1); cgroup tracking kills them. Falls back to linuxproc when the
# cgroup fs is read-only (unprivileged containers).
set -euo pipefail
cmd=${1:?usage: slurm_local.sh up|down STATE_DIR}
HERE=$(mkdir -p "${2:?state dir}" && cd "$2" && pwd)
export SLURM_CONF=$HERE/etc/slurm.conf

stop_pid() {  # $1 pid file, $2 name
  local p; p=$(cat "$1" 2>/dev/null || true)
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
  kill -TERM "$p"
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
  echo "SIGKILL $2 ($p)" >&2; kill -KILL "$p"
}

if [ "$cmd" = down ]; then
  scancel --user="$(id -un)" 2>/dev/null || true
  stop_pid "$HERE/state/slurmd.pid" slurmd
  stop_pid "$HERE/state/slurmctld.pid" slurmctld
  [ -f "$HERE/munged.started" ] && stop_pid /run/munge/munged.pid munged && rm -f "$HERE/munged.started"
  for d in $(find /sys/fs/cgroup/*/slurm_"$(hostname -s)" -depth -type d 2>/dev/null); do rmdir "$d" 2>/dev/null || true; done
  exit 0
fi
[ "$cmd" = up ] || { echo "unknown command $cmd" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "a local Slurm cluster needs root (daemons run as root, packages via apt-get)" >&2; exit 3; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
  command -v apt-get >/dev/null || { echo "no apt-get: install slurmctld slurmd slurm-client munge yourself" >&2; exit 3; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || { echo "apt-get update failed (no package access)" >&2; exit 3; }
  # pinned by Debian 12 (slurm 22.05.8); postinst does not start daemons without systemd
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { echo "apt-get install of slurm failed" >&2; exit 3; }
fi

# munge: key from the postinst (created if missing); runs as user munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  touch "$HERE/munged.started"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

mkdir -p "$HERE/etc" "$HERE/log" "$HERE/state" "$HERE/spool"
HOST=$(hostname -s)
PROCTRACK=${PROCTRACK:-cgroup}
if [ "$PROCTRACK" = cgroup ] && ! { [ -w /sys/fs/cgroup/freezer ] || [ -w /sys/fs/cgroup/cgroup.subtree_control ]; }; then
  PROCTRACK=linuxproc
fi
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 85 / 100 ))   # below what slurmd -C detects
cat > "$SLURM_CONF" <<CONF
ClusterName=megarl-local
SlurmctldHost=${HOST}
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again once its old credential expired (default 120 s): 10 s here
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/${PROCTRACK}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${HERE}/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=${HERE}/state/slurmctld.pid
SlurmdPidFile=${HERE}/state/slurmd.pid
StateSaveLocation=${HERE}/state
SlurmdSpoolDir=${HERE}/spool
SlurmctldLogFile=${HERE}/log/slurmctld.log
SlurmdLogFile=${HERE}/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
SchedulerType=sched/backfill
NodeName=${HOST} CPUs=$(nproc) RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
cat > "$HERE/etc/cgroup.conf" <<CONF
CgroupPlugin=autodetect
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
CONF
slurmctld -c   # a fresh controller state: job ids restart, nothing is reloaded
slurmd
for _ in $(seq 100); do
  st=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
  [ "$st" = idle ] && break
  sleep 0.2
done
[ "$st" = idle ] || { echo "slurm node is '$st', not idle:" >&2; tail -20 "$HERE/log/slurmctld.log" "$HERE/log/slurmd.log" >&2; exit 1; }
echo "export SLURM_CONF=$SLURM_CONF"
