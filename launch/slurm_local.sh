#!/usr/bin/env bash
# A real SLURM cluster of two nodes on this one machine (Debian/Ubuntu's slurm-wlm + munge), so
# launch/train_slurm.sh can be run, preempted and requeued for real, on CPUs: what the SLURM
# tests (tests/test_slurm.py) need. From a clone:
#
#   sudo bash launch/slurm_local.sh up      # install if needed, start munged, slurmctld, 2 x slurmd
#   bash launch/test.sh -k slurm            # the SLURM tests now run instead of skipping
#   bash launch/slurm_local.sh status       # sinfo + squeue
#   sudo bash launch/slurm_local.sh down    # cancel its jobs, stop the daemons (slurmd, slurmctld, munged)
#
# Nodes are node1 and node2 (partition "main", default), both this host: node names resolve
# to 127.0.0.1 through /etc/hosts, each slurmd listens on its own port. Each node offers
# every core of the machine (oversubscribed) and no GPUs, so submit CPU jobs, e.g.
#   GPUS_PER_NODE=1 sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=1 launch/train_slurm.sh ...
# Needs root (apt-get, /etc, the daemons) and apt; writes /etc/slurm/slurm.conf, /etc/munge,
# /var/spool/slurm-local and a line in /etc/hosts. Takes about a minute the first time
# (install), seconds after. A machine that is part of a real cluster already has one: not here.
# A slurm.conf this script did not write (no MARKER line; the older ../shared/tools/slurm-local.sh's,
# ClusterName=local with its state in /var/spool/slurm-local, counts as ours) makes up and down
# refuse in one line: they would overwrite that install's config and stop its daemons.
set -euo pipefail
conf=${SLURM_CONF:-/etc/slurm/slurm.conf}  # SLURM's own variable: its daemons and commands read it too
state=/var/spool/slurm-local
MARKER="# written by vae-dist launch/slurm_local.sh (a local test cluster; 'down' stops it)"

ours() {  # the slurm.conf is absent, or this script's (or the older script's) own
  [ ! -e "$conf" ] && return 0
  grep -qxF "$MARKER" "$conf" && return 0
  grep -qx 'ClusterName=local' "$conf" && grep -qx "StateSaveLocation=$state/ctld" "$conf"
}

refuse_foreign_conf() {
  ours || { echo "slurm_local.sh: $conf exists and was not written by this script (a real SLURM install?): not touching it or its daemons" >&2; exit 2; }
}

start_daemons() {
  mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge "$state/ctld" "$state/d" "$(dirname "$conf")"
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
  chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- munged
  grep -qE '^127\.0\.0\.1[[:space:]].*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts
  local host cpus mem
  host=$(hostname); cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  cat > "$conf" <<EOF
$MARKER
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d/%n
SchedulerType=sched/backfill
SelectType=select/cons_tres
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
JobRequeue=1
SlurmctldPidFile=/run/slurmctld-local.pid
SlurmdPidFile=/run/slurmd-local-%n.pid
SlurmctldLogFile=/var/log/slurmctld-local.log
SlurmdLogFile=/var/log/slurmd-local-%n.log
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  [ -f /run/slurmctld-local.pid ] && kill -0 "$(cat /run/slurmctld-local.pid)" 2>/dev/null || slurmctld
  sleep 1
  for n in node1 node2; do
    [ -f "/run/slurmd-local-$n.pid" ] && kill -0 "$(cat "/run/slurmd-local-$n.pid")" 2>/dev/null || slurmd -N "$n"
  done
  for _ in $(seq 30); do
    if [ "$(sinfo -h -o '%t' | sort -u | tr -d '\n')" = "idle" ]; then sinfo; return 0; fi
    sleep 1
  done
  echo "slurm_local.sh: nodes did not come up; see /var/log/slurmctld-local.log and /var/log/slurmd-local-*.log" >&2
  sinfo >&2 || true
  return 1
}

need_root() {
  [ "$(id -u)" = 0 ] || { echo "slurm_local.sh: $1 needs root (apt-get, /etc, the daemons): sudo bash $0 $1" >&2; exit 2; }
}

case "${1:-up}" in
  up)
    refuse_foreign_conf
    need_root up
    if ! command -v slurmctld >/dev/null && ! command -v apt-get >/dev/null; then
      echo "slurm_local.sh: SLURM is not installed and there is no apt-get to install slurm-wlm and munge" >&2; exit 2
    fi
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    start_daemons
    ;;
  status)
    command -v sinfo >/dev/null || { echo "slurm_local.sh: SLURM is not installed (sudo bash $0 up)" >&2; exit 1; }
    sinfo; squeue
    ;;
  down)
    refuse_foreign_conf
    need_root down
    # every job of the cluster's one partition, whoever submitted it: the cluster is this script's
    [ -e "$conf" ] && scancel --full --quiet --partition=main 2>/dev/null || true
    for f in /run/slurmd-local-node1.pid /run/slurmd-local-node2.pid /run/slurmctld-local.pid /run/munge/munged.pid; do
      [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
    ;;
  *)
    echo "usage: bash launch/slurm_local.sh up|status|down" >&2; exit 2
    ;;
esac
