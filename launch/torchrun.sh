#!/usr/bin/env bash
# Run `dtrain train` under torchrun on this node; copy this script and edit the defaults.
#
# One node (standalone rendezvous on localhost unless RDZV_ENDPOINT is set):
#     CONFIG=configs/digits.yaml RUN_DIR=runs/digits NPROC_PER_NODE=2 launch/torchrun.sh optim.lr=3e-3
#
# Several nodes (c10d rendezvous): run the same command on every node, same RDZV_ENDPOINT and RDZV_ID.
# The torchrun on the host named in RDZV_ENDPOINT hosts the rendezvous store (the node whose short
# hostname is the endpoint's first name is told so, without a DNS lookup); ranks are assigned by
# the rendezvous, so NODE_RANK is optional (when set it is passed on and shown in the logs).
#     NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.example:29400 RDZV_ID=exp42 \
#         CONFIG=configs/gpt.yaml RUN_DIR=/shared/runs/exp42 launch/torchrun.sh
# NNODES may be a range MIN:MAX (elastic: training starts once MIN nodes joined).
#
# Arguments are dtrain config overrides (KEY=VALUE). Environment (defaults in brackets):
#   CONFIG [configs/digits.yaml]  RUN_DIR [runs/<config name>; replaces the config file's run_dir, and a
#       run_dir=... argument replaces it]  NPROC_PER_NODE [GPUs, else 1]
#   NNODES [1]  RDZV_ENDPOINT (host:port, needed when NNODES is not 1)  RDZV_ID [dtrain]  NODE_RANK
#   LOCAL_ADDR (address other nodes reach this one at; default: torchrun's fully qualified hostname)
#   MAX_RESTARTS [3 standalone, 0 with RDZV_ENDPOINT]: torchrun's in-place restarts of all local
#       workers after a worker failure
#   SHUTDOWN_TIMEOUT [120]: seconds torchrun gives workers to write the emergency checkpoint after
#       SIGTERM before it sends SIGKILL (torchrun's own default is 30)
#   TORCHRUN [torchrun]  PYTHON [python3]
# The Kubeflow training operator's PET_NNODES / PET_RDZV_ENDPOINT / PET_RDZV_ID / PET_MAX_RESTARTS /
# PET_NPROC_PER_NODE are used when the variables above are unset.
#
# Preemption: SIGTERM, SIGINT, SIGUSR1 or SIGHUP sent to this script becomes one SIGTERM to torchrun,
# which forwards it to every worker (torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT, but a SIGUSR1
# would kill torchrun itself). dtrain then agrees on a stop at the next step boundary, commits an
# emergency checkpoint and exits 75. torchrun reports any worker exit other than 0 as its own exit 1,
# so this script reads the exit codes that the ranks of torchrun's last attempt wrote (RUN_DIR/ranks/
# rank-*.json and RUN_DIR/summary.json; an attempt restarted in place does not count) and exits with
# theirs when they all agree. A rank that cannot write its final record (the run directory's disk is
# full) says so in its log and exits with its own code, but its record still says "running", as a
# crashed rank's does: this script then exits with torchrun's code (1, a failure), since nothing shows
# that the work is saved (the next start resumes from the newest committed checkpoint either way).
# A stop that comes before any worker can save (during the config check, or while torchrun and its
# workers start) also exits 75: nothing was trained yet, so the newest committed checkpoint holds all
# the work.
# A second SIGINT (Ctrl-C twice) does not wait for the checkpoint: it SIGKILLs torchrun and the workers
# and exits 130, as plain `dtrain train` exits at once on a second Ctrl-C; other repeated signals wait.
# A signal that was ignored when this script started cannot be trapped (bash): a script started
# in the background of a non-interactive shell (`cmd &`) ignores SIGINT, so stop it with SIGTERM.
# Exit codes: 0 done (finished or early-stopped), 75 preempted with a committed checkpoint, or before
# training started (requeue and run the same command again: it resumes), 2 config error, 130 a second
# Ctrl-C, anything else a failure.
set -uo pipefail

CONFIG=${CONFIG:-configs/digits.yaml}
RUN_DIR=${RUN_DIR:-runs/$(basename "${CONFIG%.*}")}
NNODES=${NNODES:-${PET_NNODES:-1}}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}
RDZV_ID=${RDZV_ID:-${PET_RDZV_ID:-dtrain}}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}
TORCHRUN=${TORCHRUN:-torchrun}
PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    # The operator's value as it is (checked below: torchrun's auto/cpu/gpu/xpu pass through); else GPUs.
    NPROC_PER_NODE=${PET_NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
    [[ -n "${PET_NPROC_PER_NODE:-}" || "$NPROC_PER_NODE" =~ ^[1-9] ]] || NPROC_PER_NODE=1
fi

log() { echo "[torchrun.sh ${HOSTNAME%%.*} $(date +%H:%M:%S)] $*" >&2; }

# Launcher settings are checked here, like the config below: a bad value exits 2 (not retried by
# Slurm or a Job's podFailurePolicy) with its name, instead of a torchrun traceback and exit 1.
check_env() {  # NAME VALUE REGEX WHAT
    [[ "$2" =~ $3 ]] && return
    log "$1=$2 is not valid: expected $4 (set it in the environment, or unset it for the default)"
    exit 2
}
check_env NPROC_PER_NODE "$NPROC_PER_NODE" '^([1-9][0-9]*|auto|cpu|gpu|xpu)$' \
    "a positive number of processes per node (or torchrun's auto, cpu, gpu, xpu)"
check_env NNODES "$NNODES" '^[1-9][0-9]*(:[1-9][0-9]*)?$' "a positive number of nodes, or a range MIN:MAX"
check_env SHUTDOWN_TIMEOUT "$SHUTDOWN_TIMEOUT" '^[0-9]+$' "a whole number of seconds"

# In-place restarts re-form reliably on one node, and across nodes after a worker crash; but a
# replaced peer (a new torchrun next to restarted ones) failed to rejoin in our tests, so across
# nodes the default is 0 and the scheduler restarts everything.
MAX_RESTARTS=${MAX_RESTARTS:-${PET_MAX_RESTARTS:-}}
[[ -n "$MAX_RESTARTS" ]] || { [[ -n "$RDZV_ENDPOINT" ]] && MAX_RESTARTS=0 || MAX_RESTARTS=3; }
check_env MAX_RESTARTS "$MAX_RESTARTS" '^[0-9]+$' "a whole number of in-place restarts (0 for none)"
args=(--nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
if [[ -n "$RDZV_ENDPOINT" ]]; then
    args+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
    # A fresh store per rendezvous round, hosted by rank 0: torchrun's default store is shared by
    # every round, and a node restarted for another node's failure does not count a restart, so
    # the nodes' attempt numbers (dtrain's key prefix there) drift apart and the group never forms.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    if [[ -n "${NODE_RANK:-}" ]]; then args+=(--node-rank "$NODE_RANK"); fi
    # torchrun decides whether it hosts the store by comparing the endpoint's name with its hostname
    # and, failing that, by resolving it (DNS): a pod's own name under a Service (dtrain-0.dtrain)
    # may not resolve yet when the pod starts, and then no node hosts the store and the rendezvous
    # times out on all of them. The node whose short hostname begins that name hosts it. (A name equal
    # to the hostname is left to torchrun, which then also copes with several nodes on one machine.)
    rdzv_host=${RDZV_ENDPOINT%:*}
    if [[ "$rdzv_host" == "${HOSTNAME%%.*}".* ]]; then args+=(--rdzv-conf is_host=1); fi
elif [[ "$NNODES" == 1 || "$NNODES" == 1:1 ]]; then
    args+=(--standalone)
else
    log "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the same on every node)"
    exit 2
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then args+=(--local-addr "$LOCAL_ADDR"); fi
# Read by torchrun >= 2.9 (older versions ignore it and wait 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT

# Stamp of every exit-code file before the run, so that only files this run wrote are read after it.
exit_files_stamp() {
    "$PYTHON" - "$RUN_DIR" <<'EOF' | sort
import glob, os, sys
run_dir = sys.argv[1]
for path in sorted(glob.glob(os.path.join(run_dir, "ranks", "rank-*.json")) + [os.path.join(run_dir, "summary.json")]):
    if os.path.exists(path):
        print(f"{os.stat(path).st_mtime_ns} {path}")
EOF
}

# "CODE ATTEMPT [RANK ERROR]": the exit code every rank of torchrun's last attempt recorded, or nothing when
# they disagree or wrote none. With MAX_RESTARTS > 0 torchrun restarts the workers in place, and the records
# of an earlier attempt (a 75 of a preemption that torchrun restarted, say) must not speak for a later
# one that crashed. So every record carries its attempt (torchrun's TORCHELASTIC_RESTART_COUNT), each
# rank rewrites its record as "running" (exit_code null) when it starts, and only records of the
# highest attempt count: a rank of that attempt that died left "running", so there is no agreed code.
# One exception: a config error (2) that any rank of that attempt recorded is the answer, with the
# first such rank and its error. A rank may find one alone (after the group formed); it stops torchrun,
# and the other ranks die with the group, recording nothing, but a restart would fail the same way.
# (Across nodes the counts may differ, see launch/README.md; with the default MAX_RESTARTS=0 there,
# every record is attempt 0 and the "running" rewrite alone keeps stale codes out.)
agreed_exit_code() {
    "$PYTHON" - "$1" <<'EOF'
import json, sys
records = []
for line in open(sys.argv[1]).read().splitlines():
    try:
        record = json.load(open(line.split(" ", 1)[1]))
        records.append((int(record.get("attempt", 0)), record["exit_code"], record))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
last = max((attempt for attempt, _, _ in records), default=0)
config_errors = sorted((r.get("rank", -1), " ".join(str(r.get("error", "")).split()))
                       for attempt, code, r in records if attempt == last and code == 2 and "rank" in r)
codes = {code for attempt, code, _ in records if attempt == last}
if config_errors:
    print(2, last, *config_errors[0])
elif len(codes) == 1 and isinstance(code := codes.pop(), int):
    print(code, last)
EOF
}

# Pids of torchrun's children (the workers), read from /proc so that no extra tool is needed.
workers_of() {
    local stat line rest
    for stat in /proc/[0-9]*/stat; do
        { line=$(<"$stat"); } 2>/dev/null || continue
        rest=${line##*) }            # drop "pid (comm) ": comm may contain spaces
        read -r _ ppid _ <<<"$rest"
        [[ "$ppid" == "$1" ]] && echo "${stat//[^0-9]/}"
    done
}

# Whether a process catches SIGTERM: a worker does from the first line of `python -m dtrain train` on
# (dtrain/early_signals.py); until then (Python itself starting) it has trained nothing, and the
# SIGTERM kills it.
catches_sigterm() {
    local key mask
    while read -r key mask; do
        [[ "$key" == SigCgt: ]] && return $(( (0x$mask >> 14 & 1) == 0 ))
    done 2>/dev/null <"/proc/$1/status"
    return 1
}

# The traps go in first: a stop during the checks below, or while torchrun and its workers start,
# must still end in exit 75 ("requeue me"), not in a signal death the launcher counts as a failure.
stop_requested=""
stop_at=0                # $SECONDS when the stop was passed on to torchrun
stop_before_training=""  # no worker could save when the stop came: this attempt trained nothing
torchrun_pid=""
workers=()
forward_stop() {
    if [[ -n "$stop_requested" ]]; then
        [[ "$1" == INT ]] && stop_now
        log "got SIG$1 again: the workers are already saving (a second SIGINT, Ctrl-C, stops them at once)"
        return
    fi
    stop_requested=$1
    stop_at=$SECONDS
    [[ -n "$torchrun_pid" ]] || return  # torchrun is not started at all then (below)
    mapfile -t workers < <(workers_of "$torchrun_pid")
    local pid
    stop_before_training=1
    for pid in ${workers[@]+"${workers[@]}"}; do catches_sigterm "$pid" && stop_before_training=""; done
    if [[ -n "$stop_before_training" ]]; then
        log "got SIG$1 while torchrun and its workers are starting: stopping them (SIGTERM to torchrun $torchrun_pid)"
    else
        log "got SIG$1: asking workers ${workers[*]} for an emergency checkpoint (SIGTERM to torchrun $torchrun_pid)"
    fi
    kill -TERM "$torchrun_pid" 2>/dev/null
}

# A second Ctrl-C (SIGINT) after a stop: the user wants out now, not after the emergency checkpoint,
# as with plain `dtrain train` (dtrain/preemption.py). SIGKILL torchrun, then every worker and its
# process group (its DataLoader workers and save helpers: the workers lead their own sessions), and
# exit 130, as a shell reports a command ended by Ctrl-C: not 75, since no checkpoint may have been
# committed (the run resumes from the newest one that was). Any other repeated signal keeps waiting
# for the checkpoint: schedulers send SIGTERM again, or after their warning, within the grace period.
stop_now() {
    local pid now=()
    if [[ -n "$torchrun_pid" ]]; then
        mapfile -t now < <(workers_of "$torchrun_pid")
        log "got SIGINT again: killing torchrun $torchrun_pid and its workers ${now[*]} now, without waiting for" \
            "the emergency checkpoint (exit 130); the next run resumes from the newest committed checkpoint"
        kill -KILL "$torchrun_pid" 2>/dev/null
        for pid in ${workers[@]+"${workers[@]}"} ${now[@]+"${now[@]}"}; do kill -KILL -- "-$pid" "$pid" 2>/dev/null; done
    else
        log "got SIGINT again: stopping before torchrun started (exit 130)"
    fi
    exit 130
}

for sig in TERM INT USR1 HUP; do
    # shellcheck disable=SC2064
    trap "forward_stop $sig" "$sig"
done
exit_if_stopped() {  # before torchrun starts
    [[ -n "$stop_requested" ]] || return 0
    log "stopped (SIG$stop_requested) before torchrun started: nothing was trained, so nothing is lost; run the same command again to resume (exit 75)"
    exit 75
}

# A bad config fails here, on every node, with exit 2 before any process group is formed (and
# before torchrun, which would report it as exit 1 after restarting the workers MAX_RESTARTS times).
# These are the checks every worker makes before it joins the group (dtrain.checks.check_before_start):
# keys and values, the task and its options, the backend, and the batch split over the world size
# for every world size the job may have (a number of processes per node, times each node count that
# NNODES allows: an elastic range MIN:MAX may form its group with any of them, and a size that does
# not split the batch would fail every worker there as a config error, after a preemption, say).
# What only the workers can find (a checkpoint that does not fit the model, data that is missing,
# model options the model rejects when built) they record; the first worker that finds one, on any
# rank, stops torchrun before it restarts them, and this script exits 2 and repeats the error.
# It also prints the run directory the ranks will use: a run_dir=... argument wins over RUN_DIR
# there, and the exit codes are read from it.
world_sizes=""
if [[ "$NPROC_PER_NODE" =~ ^[0-9]+$ ]]; then
    for ((nodes = ${NNODES%%:*}; nodes <= ${NNODES##*:}; nodes++)); do
        world_sizes+="${world_sizes:+,}$((NPROC_PER_NODE * nodes))"
    done
fi
resolved=$("$PYTHON" - "$world_sizes" "$NNODES" "$NPROC_PER_NODE" "$CONFIG" "run_dir=$RUN_DIR" "$@" <<'EOF'
import math, sys
from dtrain.config import check_world_size, load_config
from dtrain.errors import ConfigError
sizes = [int(n) for n in sys.argv[1].split(",")] if sys.argv[1] else []
try:
    cfg = load_config(sys.argv[4], sys.argv[5:])
    from dtrain.checks import check_before_start  # no torch (the workers import it)
    check_before_start(cfg, sizes[0] if len(sizes) == 1 else None)
    for world_size in sizes if len(sizes) > 1 else []:  # one size: checked just above
        try:
            check_world_size(cfg, world_size)
        except ConfigError as e:
            need = math.lcm(*sizes) * cfg.data.grad_accum
            raise ConfigError(f"NNODES={sys.argv[2]} x NPROC_PER_NODE={sys.argv[3]} lets the group form with any of "
                              f"{sizes} ranks; on {world_size}: {e}. A data.batch_size that is a multiple of {need} "
                              f"splits over all of them; or narrow the NNODES range") from None
except ConfigError as e:
    print(f"dtrain: config error: {e}", file=sys.stderr)
    sys.exit(2)
print(cfg.run_dir)
EOF
) || { rc=$?; exit_if_stopped; exit $rc; }  # a Ctrl-C also interrupts the check itself
exit_if_stopped
resolved=$(tail -n 1 <<<"$resolved")
if [[ "$resolved" != "$RUN_DIR" ]]; then
    log "run_dir=$resolved on the command line replaces RUN_DIR=$RUN_DIR"
    RUN_DIR=$resolved
fi

before=$(mktemp) && after=$(mktemp) && fresh=$(mktemp)
trap 'rm -f "$before" "$after" "$fresh"' EXIT
exit_files_stamp > "$before"
exit_if_stopped

log "$TORCHRUN ${args[*]} -m dtrain train --config $CONFIG run_dir=$RUN_DIR $*"
# torchrun dies of a SIGUSR1 it does not handle (Slurm signals every process of a step), so it starts
# with SIGUSR1 ignored; the workers install dtrain's own handler, which overrides the inherited ignore.
# (A subshell drops this script's traps; an ignored signal stays ignored across exec.)
(trap '' USR1; exec "$TORCHRUN" "${args[@]}" -m dtrain train --config "$CONFIG" "run_dir=$RUN_DIR" "$@") &
torchrun_pid=$!
if [[ -n "$stop_requested" ]]; then  # in the instant between the check above and the start
    stop_before_training=1
    kill -TERM "$torchrun_pid" 2>/dev/null
fi

# `wait` returns early when a trapped signal arrives; keep waiting until torchrun has really exited.
while true; do
    wait "$torchrun_pid"
    rc=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break
done
# A second signal makes torchrun give up waiting for its workers: wait for them here instead, or the
# exit codes below would be read before the emergency checkpoint is committed.
deadline=$((SECONDS + SHUTDOWN_TIMEOUT))
# (${a[@]+...}: bash before 4.4 takes an empty array for an unset variable under `set -u`)
for pid in ${workers[@]+"${workers[@]}"}; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
done
trap - TERM INT USR1 HUP

code=""
if [[ $rc -ne 0 ]]; then
    exit_files_stamp > "$after"
    comm -13 "$before" "$after" > "$fresh"
    read -r code attempt error_rank error < <(agreed_exit_code "$fresh")
    if [[ "$code" == 2 ]]; then
        # The workers' config error is easy to miss above: torchrun's own traceback (SignalException:
        # "got signal: 15") comes last, and is the stop the rank asked for, not another error.
        log "torchrun exited $rc: rank $error_rank of its last attempt (restart $attempt) found a config error:" \
            "$error. The workers were not restarted, which would fail the same way (a SignalException traceback" \
            "of torchrun above is a rank stopping it for that). Fix the config and run again (exit 2)"
        rc=$code
    elif [[ -n "$code" ]]; then
        log "torchrun exited $rc; the ranks of its last attempt (restart $attempt) exited $code"
        rc=$code
    fi
fi
if [[ $rc -ne 0 && -z "$code" && -n "$stop_before_training" ]]; then
    # torchrun or its workers were still starting, before dtrain's handler: they died of the stop
    log "stopped (SIG$stop_requested) while torchrun and its workers were starting (torchrun exited $rc): nothing was trained, so nothing is lost; run the same command again to resume (exit 75)"
    rc=75
elif [[ $rc -eq 75 ]]; then
    log "preempted: the emergency checkpoint is committed; run the same command again to resume (exit 75)"
elif [[ -n "$stop_requested" && -z "$code" ]] && ((SECONDS - stop_at >= SHUTDOWN_TIMEOUT)); then
    log "stop (SIG$stop_requested) requested, but no rank recorded an exit code: torchrun killed the workers" \
        "SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT s after passing the stop on, before the emergency checkpoint was" \
        "committed (the run resumes from the one before). Raise SHUTDOWN_TIMEOUT above the time two steps," \
        "an evaluation and a save take, and the platform's grace period above that (exit $rc)"
elif [[ $rc -ne 0 && -z "$code" ]]; then
    # No record at all: a worker died before writing its own (a crash, a kill), or could not write it
    # (a full disk: the worker then logged "cannot write ..." and exited with its own code, which
    # torchrun reports as 1). Without a record nothing says the run's work is safe: a failure.
    log "torchrun exited $rc and no rank of this attempt recorded an exit code under $RUN_DIR/ranks" \
        "${stop_requested:+(after SIG$stop_requested) }(a worker crashed or was killed, or could not write" \
        "there: see the workers' errors above); exit $rc. Running the same command again resumes from" \
        "the newest committed checkpoint"
elif [[ -n "$stop_requested" ]]; then
    log "stop (SIG$stop_requested) requested, but the workers exited $rc"
fi
exit "$rc"
