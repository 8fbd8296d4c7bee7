#!/usr/bin/env bash
# A throwaway single-node Slurm cluster on this machine, for tests and trying the profile.
#
#   scripts/local_slurm.sh start     # munged + slurmctld + slurmd; prints the env file to source
#   scripts/local_slurm.sh stop      # stops the three daemons by PID (pidfiles), never by name
#   scripts/local_slurm.sh status
#
# Needs root and Debian's `slurm-wlm munge` (apt-get install -y slurm-wlm munge); no systemd.
# Everything lives in one state folder (UNIKE_SLURM_STATE, default /tmp/unike-slurm): the
# slurm.conf and gres.conf, its own munged (socket, key copy), pidfiles, spool and logs, and
# its own ports, so a system munged is left alone. Clients must find the config at Slurm's
# default path: SLURM_CONF does not work, because the plugin's job step removes every
# SLURM_* variable before its nested `srun` (which then fails: "Could not establish a
# configuration source"). So `start` links /etc/slurm/slurm.conf to $STATE/slurm.conf,
# refusing if a slurm.conf it did not make is there, and `stop` removes that link.
#
#   FAKE_GPU=1   one fake GPU (gres.conf with File=/dev/null): `--gpus=1` jobs are scheduled,
#                run on the CPU and see CUDA_VISIBLE_DEVICES=0. Without it they are rejected.
#   UNIKE_SLURMCTLD_PORT / UNIKE_SLURMD_PORT   ports (default 6917 / 6918).
#
# Settings that matter for snakemake-executor-plugin-slurm (found by running it):
#   - no slurmdbd here, so `sacct` fails: a profile for this cluster must set
#     `slurm-status-command: squeue`, or the plugin waits forever;
#   - MinJobAge stays at Slurm's default (300 s): squeue must still list finished jobs when
#     the plugin polls.
set -euo pipefail

STATE=${UNIKE_SLURM_STATE:-/tmp/unike-slurm}
CTLD_PORT=${UNIKE_SLURMCTLD_PORT:-6917}
SLURMD_PORT=${UNIKE_SLURMD_PORT:-6918}
FAKE_GPU=${FAKE_GPU:-0}
NODE=localhost
MUNGE_DIR=$STATE/munge
ETC_CONF=/etc/slurm/slurm.conf
PIDFILES=("$STATE/run/slurmd.pid" "$STATE/run/slurmctld.pid" "$MUNGE_DIR/munged.pid")  # stop order

die() { echo "local_slurm: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the pid in it runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

port_in_use() {
    # bash's /dev/tcp: a connection succeeds only if something listens
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

stop() {
    local f p
    for f in "${PIDFILES[@]}"; do
        [ -s "$f" ] || continue
        p=$(cat "$f")
        if kill "$p" 2>/dev/null; then
            for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
            if kill -0 "$p" 2>/dev/null; then
                kill -9 "$p" 2>/dev/null || true
            fi
        fi
        rm -f "$f"
    done
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$STATE/slurm.conf" ]; then
        rm -f "$ETC_CONF"
    fi
    echo "local_slurm: stopped ($STATE)"
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (starts munged as user munge, slurmctld and slurmd)"
    for bin in munged munge slurmctld slurmd sinfo sbatch; do
        command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || die "$bin not found: apt-get install -y slurm-wlm munge"
    done
    for f in "${PIDFILES[@]}"; do
        alive "$f" && die "already running ($f); run '$0 stop' first"
    done
    if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
        # only a link of ours whose cluster is gone (left by a killed run) may be replaced
        [ -L "$ETC_CONF" ] && { [ ! -e "$ETC_CONF" ] || [ "$(readlink "$ETC_CONF")" = "$STATE/slurm.conf" ]; } \
            || die "$ETC_CONF exists (another Slurm here?); this script only replaces a stale link of its own"
        rm -f "$ETC_CONF"
    fi
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        port_in_use "$port" && die "port $port is in use; set UNIKE_SLURMCTLD_PORT / UNIKE_SLURMD_PORT"
    done

    case $STATE in /*) ;; *) die "UNIKE_SLURM_STATE must be an absolute path" ;; esac
    # a fresh cluster each time (no jobs left from an earlier one); only what this script made
    rm -rf "$STATE/run" "$STATE/log" "$STATE/spool" "$MUNGE_DIR" "$STATE/slurm.conf" "$STATE/gres.conf"
    install -d -m 0755 "$STATE" "$STATE/run" "$STATE/log" "$STATE/spool/ctld" "$STATE/spool/d"
    chmod 0755 "$STATE"   # munged (user munge) must reach its folder inside
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"

    # munge: its own key, socket, pid, log and seed files, so a system munged is untouched.
    if [ -s /etc/munge/munge.key ]; then
        install -o munge -g munge -m 0400 /etc/munge/munge.key "$MUNGE_DIR/munge.key"
    else
        head -c 1024 /dev/urandom > "$MUNGE_DIR/munge.key"
        chown munge:munge "$MUNGE_DIR/munge.key"; chmod 0400 "$MUNGE_DIR/munge.key"
    fi
    local sock=$MUNGE_DIR/munge.sock
    runuser -u munge -- "$(command -v munged || echo /usr/sbin/munged)" --socket="$sock" \
        --key-file="$MUNGE_DIR/munge.key" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    munge --socket="$sock" -n | unmunge --socket="$sock" >/dev/null || die "munge does not work"

    local mem gres_node="" gres_types=""
    mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 2 / 3 ))
    if [ "$FAKE_GPU" = 1 ]; then
        gres_types="GresTypes=gpu"; gres_node="Gres=gpu:1"
        echo "NodeName=$NODE Name=gpu File=/dev/null" > "$STATE/gres.conf"
    fi
    cat > "$STATE/slurm.conf" <<EOF
# written by scripts/local_slurm.sh
ClusterName=unikelocal
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MinJobAge=300
ReturnToService=2
$gres_types
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    install -d /etc/slurm
    ln -s "$STATE/slurm.conf" "$ETC_CONF"
    export SLURM_CONF=$STATE/slurm.conf   # the daemons read gres.conf beside it

    "$(command -v slurmctld || echo /usr/sbin/slurmctld)"      # forks; pid -> $STATE/run/slurmctld.pid
    "$(command -v slurmd || echo /usr/sbin/slurmd)" -N "$NODE"  # forks; pid -> $STATE/run/slurmd.pid
    for _ in $(seq 60); do
        sinfo -h -o %t 2>/dev/null | grep -qx idle && break
        sleep 0.5
    done
    sinfo -h -o %t 2>/dev/null | grep -qx idle || {
        tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
        stop
        die "the node did not become idle"
    }
    sbatch --wait --parsable -o /dev/null --wrap true >/dev/null || { stop; die "a test job failed"; }
    echo "local_slurm: up (munged=$(cat "$MUNGE_DIR/munged.pid") slurmctld=$(cat "$STATE/run/slurmctld.pid")" \
         "slurmd=$(cat "$STATE/run/slurmd.pid") fake_gpu=$FAKE_GPU; $ETC_CONF -> $STATE/slurm.conf)"
}

status() {
    local f ok=0
    for f in "${PIDFILES[@]}"; do
        if alive "$f"; then echo "$(basename "$f" .pid): $(cat "$f")"; else echo "$(basename "$f" .pid): down"; ok=1; fi
    done
    [ "$ok" = 0 ] && sinfo
    return $ok
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (env: FAKE_GPU=1, UNIKE_SLURM_STATE, UNIKE_SLURMCTLD_PORT, UNIKE_SLURMD_PORT)" >&2; exit 2 ;;
esac
