#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: NUM_PROCESSES copies of the trainer, each seeing
# DEVICES_PER_PROCESS simulated CPU devices, joined through a coordinator on 127.0.0.1.
set -euo pipefail

PROG=${0##*/}
USAGE_LINE="Usage: $PROG [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS [main.py flags...]"

usage() {
  cat <<EOF
$USAGE_LINE

Start NUM_PROCESSES copies of 'python -m sslm_jax.main' on this machine, process i with
  JAX_PLATFORMS=cpu
  XLA_FLAGS=<existing XLA_FLAGS> --xla_force_host_platform_device_count=DEVICES_PER_PROCESS
  --coordinator_address=127.0.0.1:PORT --num_processes=NUM_PROCESSES --process_id=i
and every other argument forwarded unchanged. This is the same multi-process code path as a TPU
pod or a GPU cluster, so 'local_multiprocess.sh 2 4 ...' rehearses an 8-device, 2-host run.

Output of process i goes to stdout with the prefix '[i] '. The launcher waits for all processes;
if one exits with an error, the others are stopped and the launcher exits with that status.
Ctrl-C (SIGINT) or SIGTERM is forwarded to every process; any still running after
SSLM_KILL_GRACE seconds is killed.

Options:
  --dry-run     print the command of each process, one per line, and exit
  -h, --help    show this help

Environment:
  SSLM_PORT        coordinator port (default: a free port chosen by the OS)
  SSLM_LOG_DIR     write process i's output to SSLM_LOG_DIR/process_i.log instead of stdout
  SSLM_KILL_GRACE  seconds between SIGTERM and SIGKILL when stopping processes (default 10)
  PYTHON           Python interpreter to run (default: python)

Example (run from the repository root, rerun to resume):
  $PROG 2 4 --config=configs/gpt_tiny.py --workdir=runs/pod_rehearsal
EOF
}

usage_error() {
  printf '%s: %s\n%s\n' "$PROG" "$1" "$USAGE_LINE" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
case ${1:-} in
  -h | --help)
    usage
    exit 0
    ;;
esac
(($# >= 2)) || usage_error "NUM_PROCESSES and DEVICES_PER_PROCESS are required."
is_count "$1" || usage_error "NUM_PROCESSES must be a positive integer, got '$1'."
is_count "$2" || usage_error "DEVICES_PER_PROCESS must be a positive integer, got '$2'."
num_processes=$1
devices_per_process=$2
shift 2

for arg in "$@"; do
  if [[ $arg =~ ^--?(coordinator_address|num_processes|process_id)(=|$) ]]; then
    usage_error "'$arg' is set by the launcher; remove it."
  fi
done

python=${PYTHON:-python}
log_dir=${SSLM_LOG_DIR:-}
grace=${SSLM_KILL_GRACE:-10}
[[ $grace =~ ^[0-9]+$ ]] || usage_error "SSLM_KILL_GRACE must be a whole number of seconds."

if [[ -n ${SSLM_PORT:-} ]]; then
  if ! [[ $SSLM_PORT =~ ^[0-9]+$ ]] || ((10#$SSLM_PORT < 1 || 10#$SSLM_PORT > 65535)); then
    usage_error "SSLM_PORT must be a port number, got '$SSLM_PORT'."
  fi
  port=$SSLM_PORT
else
  port=$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
fi

# Keep the caller's XLA_FLAGS, replacing any simulated device count it already holds.
xla_flags=""
read -r -a existing_flags <<<"${XLA_FLAGS:-}"
for flag in ${existing_flags[@]+"${existing_flags[@]}"}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"

# Sets the global array `cmd` to process $1's command; the remaining arguments are forwarded.
build_cmd() {
  local process_id=$1
  shift
  cmd=(
    env
    JAX_PLATFORMS=cpu
    "XLA_FLAGS=$xla_flags"
    "TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}"
    PYTHONUNBUFFERED=1
    "$python" -m sslm_jax.main
    "$@"
    "--coordinator_address=127.0.0.1:$port"
    "--num_processes=$num_processes"
    "--process_id=$process_id"
  )
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    build_cmd "$i" "$@"
    line=$(printf '%q ' "${cmd[@]}")
    printf '%s\n' "${line% }"
  done
  exit 0
fi

pids=()
readers=()
tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/sslm_launch.XXXXXX")
trap 'rm -rf "$tmp_dir"' EXIT

# Each process runs in its own process group (its pid is the group id), so a signal reaches
# anything it started, and a Ctrl-C in the terminal reaches only this launcher, which forwards it.
group_alive() { kill -0 -- "-$1" 2>/dev/null; }

any_alive() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    if [[ -n $pid ]] && group_alive "$pid"; then
      return 0
    fi
  done
  return 1
}

# Send $1 to every process group still running; SIGKILL whatever outlives the grace period.
stop_all() {
  local signal=$1 pid ticks=0
  for pid in ${pids[@]+"${pids[@]}"}; do
    if [[ -n $pid ]]; then
      kill "-$signal" -- "-$pid" 2>/dev/null || true
    fi
  done
  while any_alive && ((ticks < grace * 5)); do
    sleep 0.2
    ticks=$((ticks + 1))
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    if [[ -n $pid ]] && group_alive "$pid"; then
      printf '%s: process group %s did not stop in %ss; killing it.\n' "$PROG" "$pid" "$grace" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    if [[ -n $pid ]]; then
      wait "$pid" 2>/dev/null || true
    fi
  done
}

# Let the prefixing readers print what is left, for at most the grace period.
drain_readers() {
  local pid ticks=0
  for pid in ${readers[@]+"${readers[@]}"}; do
    while kill -0 "$pid" 2>/dev/null && ((ticks < grace * 5)); do
      sleep 0.2
      ticks=$((ticks + 1))
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2329  # called from the traps below
on_signal() {
  trap '' INT TERM
  printf '%s: received SIG%s; stopping all processes.\n' "$PROG" "$1" >&2
  stop_all "$1"
  drain_readers
  exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

if [[ -n $log_dir ]]; then
  mkdir -p "$log_dir"
fi
for ((i = 0; i < num_processes; i++)); do
  build_cmd "$i" "$@"
  if [[ -n $log_dir ]]; then
    out="$log_dir/process_$i.log"
  else
    out="$tmp_dir/$i"
    mkfifo "$out"
    awk -v prefix="[$i] " '{ print prefix $0; fflush() }' <"$out" &
    readers+=("$!")
  fi
  set -m # job control on for this one launch: the process gets its own process group
  "${cmd[@]}" </dev/null >"$out" 2>&1 &
  pids+=("$!")
  set +m
done
where=${log_dir:+"; logs in $log_dir/process_<i>.log"}
printf '%s: started %d processes, %d CPU devices each, coordinator 127.0.0.1:%s%s\n' \
  "$PROG" "$num_processes" "$devices_per_process" "$port" "$where" >&2

status=0
remaining=$num_processes
while ((remaining > 0)); do
  for ((i = 0; i < num_processes; i++)); do
    pid=${pids[i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      printf '%s: process %d exited with status %d; stopping the others.\n' "$PROG" "$i" "$rc" >&2
      status=$rc
      trap '' INT TERM
      stop_all TERM
      remaining=0
      break
    fi
  done
  if ((remaining > 0)); then
    sleep 0.2
  fi
done
drain_readers
exit "$status"
