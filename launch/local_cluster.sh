#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the real-cluster tests (tests/test_slurm_cluster.py, `pytest -m
# slurm`) and for trying launch.slurm by hand. Debian/Ubuntu, as root, no systemd needed.
#
#   bash launch/local_cluster.sh            # install if missing, configure, start, wait until the node is idle
#   bash launch/local_cluster.sh --stop     # stop the daemons this script started (config and state stay)
#   bash launch/local_cluster.sh --status   # one line: up or not (exit 0 / 1), changes nothing
#
# What it does (docs/launch.md, "A SLURM cluster on one machine"):
#   1. installs slurmctld, slurmd, slurm-client and munge with apt-get when any of them is missing;
#   2. writes /etc/slurm/slurm.conf for this node: its real CPU layout and memory (from `slurmd -C`), one
#      partition `debug` (default, no time cap), cons_tres over cores, proctrack/linuxproc, task/none, no cgroups,
#      no accounting, no GRES (a count-only GPU GRES without device files drains the node), JobRequeue=1, and
#      AuthInfo=cred_expire=$CRED_EXPIRE (a requeued job may start again cred_expire+1 s after the requeue);
#      a slurm.conf it did not write is never touched (error instead);
#   3. makes a munge key if there is none, then starts munged (as the munge user), slurmctld and slurmd as
#      plain daemons, each only if it is not already running (pid file + a live process); a slurmctld started
#      afresh forgets the jobs of an earlier life of the cluster (slurmctld -c), whose processes are gone;
#   4. waits until the node is idle (or already running jobs) and prints one line.
# Run again, it changes nothing and prints the same line (a changed node or option rewrites slurm.conf and
# restarts the two SLURM daemons). Any failure: one `error:` line on stderr, naming the log to read, exit 1.
#
# Environment: CRED_EXPIRE (default 30 s; SLURM's default 120 makes a requeued job wait ~2.5 min),
# WAIT_S (default 120: how long to wait for the node), SLURM_CONF (default /etc/slurm/slurm.conf).
set -euo pipefail

CRED_EXPIRE=${CRED_EXPIRE:-30}
WAIT_S=${WAIT_S:-120}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# Written by diffv2 launch/local_cluster.sh: a one-node test cluster. Delete this file to write your own."
LOGS=/var/log/slurm
STATE=/var/lib/slurm
RUN=/run/slurm
START=$SECONDS

die() { echo "error: $*" >&2; exit 1; }

alive() {  # pid file -> true if its process runs the named program
  local pid
  [ -r "$1" ] && pid=$(cat "$1" 2> /dev/null) && [ -n "$pid" ] && [ -d "/proc/$pid" ] \
    && grep -q "$2" "/proc/$pid/comm" 2> /dev/null
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2> /dev/null | head -n 1 || true; }

stop_daemon() {  # pid file, program: TERM, wait up to 20 s, then KILL; only the process named in the pid file
  local pid i
  alive "$1" "$2" || return 0
  pid=$(cat "$1")
  kill "$pid" 2> /dev/null || true
  for i in $(seq 100); do [ -d "/proc/$pid" ] || return 0; sleep 0.2; done
  kill -9 "$pid" 2> /dev/null || true
}

case "${1:-}" in
  '' | --stop | --status) ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) die "unknown option ${1} (usage: bash launch/local_cluster.sh [--stop | --status])" ;;
esac
case "$CRED_EXPIRE" in '' | *[!0-9]*) die "CRED_EXPIRE='$CRED_EXPIRE' is not a number of seconds" ;; esac
case "$WAIT_S" in '' | *[!0-9]*) die "WAIT_S='$WAIT_S' is not a number of seconds" ;; esac

if [ "${1:-}" = --status ]; then
  command -v sinfo > /dev/null || { echo "slurm: not installed"; exit 1; }
  out=$(sinfo -h -N -o '%N %T %c %m' 2> /dev/null | head -n 1) || true
  [ -n "$out" ] || { echo "slurm: no controller answers (sinfo failed)"; exit 1; }
  echo "slurm: node $out"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root (it installs packages, writes /etc/slurm and starts daemons)"

if [ "${1:-}" = --stop ]; then
  stop_daemon "$RUN/slurmd.pid" slurmd
  stop_daemon "$RUN/slurmctld.pid" slurmctld
  stop_daemon /run/munge/munged.pid munged
  echo "slurm: stopped slurmd, slurmctld and munged (config $CONF and state $STATE kept)"
  exit 0
fi

# 1. packages
missing=()
for prog in slurmctld slurmd sinfo munged; do command -v "$prog" > /dev/null || missing+=("$prog"); done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get > /dev/null || die "${missing[*]} missing and no apt-get: install SLURM and munge by hand"
  log=$(mktemp /tmp/local_cluster-apt.XXXXXX)
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client munge; } > "$log" 2>&1; then
    die "apt-get install slurmctld slurmd slurm-client munge failed: $(tail -n 1 "$log") (full output: $log)"
  fi
  rm -f "$log"
fi

# 2. slurm.conf for this node
NODE=$(hostname -s)
[ -n "$NODE" ] || die "hostname -s is empty; give the machine a host name"
HW=$(slurmd -C 2> /dev/null | head -n 1) || true
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<< "$HW"; }
CPUS=$(field CPUs); SOCKETS=$(field SocketsPerBoard); CORES=$(field CoresPerSocket); THREADS=$(field ThreadsPerCore)
MEM=$(field RealMemory)
[ -n "$CPUS" ] && [ -n "$MEM" ] && [ -n "$CORES" ] || die "slurmd -C did not describe this node (got: '${HW}')"
SLURM_USER=slurm
id -u slurm > /dev/null 2>&1 || SLURM_USER=root
CONF_TEXT="$MARK
ClusterName=diffv2-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=$SLURM_USER
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
if [ -e "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
  die "$CONF exists and was not written by this script; this machine has its own SLURM set-up (move the file away to let the script write one)"
fi
changed=0
if [ "$(cat "$CONF" 2> /dev/null || true)" != "$CONF_TEXT" ]; then
  mkdir -p "$(dirname "$CONF")"
  printf '%s\n' "$CONF_TEXT" > "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  changed=1
fi
mkdir -p "$LOGS" "$STATE/slurmctld" "$STATE/slurmd" "$RUN"
chown "$SLURM_USER:" "$LOGS" "$STATE/slurmctld" "$RUN"

# 3. munge, slurmctld, slurmd
KEY=/etc/munge/munge.key
if [ ! -s "$KEY" ]; then
  mkdir -p /etc/munge
  if command -v mungekey > /dev/null; then mungekey -c -f -k "$KEY"; else dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none; fi
fi
chown munge: /etc/munge "$KEY"
chmod 700 /etc/munge
chmod 400 "$KEY"
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge: /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if ! alive /run/munge/munged.pid munged; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged || die "munged did not start (log: /var/log/munge/munged.log)"
fi
for i in $(seq 50); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.2; done
munge -n 2> /dev/null | unmunge > /dev/null 2>&1 || die "munge does not answer (log: /var/log/munge/munged.log)"

was_running=0
alive "$RUN/slurmctld.pid" slurmctld && was_running=1
if [ "$changed" = 1 ]; then  # a rewritten slurm.conf: restart what runs with the old one
  stop_daemon "$RUN/slurmd.pid" slurmd
  stop_daemon "$RUN/slurmctld.pid" slurmctld
fi
if ! alive "$RUN/slurmctld.pid" slurmctld; then
  # -c: no jobs from an earlier life of this test cluster (their processes are gone) come back to take the node;
  # a restart for a changed slurm.conf keeps them.
  clear=-c
  [ "$changed" = 1 ] && [ "$was_running" = 1 ] && clear=
  slurmctld $clear > /dev/null 2>&1 || die "slurmctld did not start (log: $LOGS/slurmctld.log: $(tail -n 1 "$LOGS/slurmctld.log" 2> /dev/null))"
fi
if ! alive "$RUN/slurmd.pid" slurmd; then
  slurmd -N "$NODE" > /dev/null 2>&1 || die "slurmd did not start (log: $LOGS/slurmd.log: $(tail -n 1 "$LOGS/slurmd.log" 2> /dev/null))"
fi

# 4. wait for the node
state=
for i in $(seq $((WAIT_S * 2))); do
  state=$(node_state)
  case "$state" in
    idle | mixed | allocated | completing) break ;;
    drain* | down*)  # e.g. left drained by an earlier configuration: the new one is valid, give it back
      scontrol update NodeName="$NODE" State=RESUME > /dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle | mixed | allocated | completing) ;;
  *)
    reason=$(sinfo -h -N -n "$NODE" -o %E 2> /dev/null | head -n 1 || true)
    die "node $NODE is '${state:-unknown: sinfo gets no answer}' after ${WAIT_S} s${reason:+ (reason: $reason)}; see $LOGS/slurmctld.log and $LOGS/slurmd.log" ;;
esac
version=$(sinfo --version 2> /dev/null | awk '{print $2}')
echo "slurm: one-node cluster up: node $NODE ($CPUS CPUs, $MEM MB) $state in partition debug, slurm $version, cred_expire=${CRED_EXPIRE}s, conf $CONF ($((SECONDS - START)) s)"
