#!/usr/bin/env bash
# Run the trainer on every worker of a Cloud TPU VM slice (one host, a whole pod, or several
# slices joined over the data-center network) with gcloud.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USAGE_LINE="Usage: $PROG --name=NAME --zone=ZONE [options] [-- main.py flags...]"
# Matches the trainer's python process on a worker, but neither its 'sh -c' wrapper nor a remote
# shell whose command line carries this pattern (the brackets keep the pattern from matching itself).
TRAINER_PATTERN='^[^ ]*python[0-9.]* -m [s]slm_jax[.]main'
POLL_SECONDS=30
DEFAULT_PYTHON=3.11 # jax 0.10 and later need Python 3.11 or newer

usage() {
  cat <<EOF
$USAGE_LINE

Runs 'python -m sslm_jax.main <main.py flags>' on all workers of the Cloud TPU VM NAME at once,
detached from this terminal, then streams every worker's log prefixed with '[worker N] '. On a
TPU VM the processes find each other by themselves; no extra flags are needed. Steps, in order:
find (with --create, create) the TPU VM, or with --num-slices=N>1 the queued resource NAME whose
N slices are named NAME-0 ... NAME-(N-1), and wait until it is ACTIVE; copy this checkout to every
worker (or clone --git-url there); install it with uv into a virtual environment, DIR/.venv, of
Python --python; start the trainer in the background (setsid + nohup, output in
DIR/logs/train.log on each worker); stream the logs until every trainer has exited; with
--delete, delete the TPU.

Ctrl-C, or a dropped connection, stops only the log stream: the run goes on. Follow it again
with --logs, stop it with --stop (the trainer saves a checkpoint and exits).

With --num-slices=N the slices find each other by themselves too: Cloud TPU gives the workers of
a multi-node queued resource the MEGASCALE_* settings (coordinator, number of slices, slice id)
in their metadata (tpu-env), where jax reads them.

The workdir must be storage that every worker sees: use a gs:// path on a pod, e.g.
--workdir=gs://BUCKET/runs/NAME (the workers' service account needs write access to the bucket).
Rerunning the same command resumes from the newest checkpoint in the workdir.

Options (some can also be given by the environment variable in brackets):
  --name=NAME               TPU VM name, or queued resource name with --num-slices>1 [TPU_NAME];
                            required
  --zone=ZONE               zone, e.g. us-east5-a [TPU_ZONE]; required
  --project=PROJECT         Google Cloud project [TPU_PROJECT] (default: gcloud's configured one)
  --num-slices=N            run on N slices of --accelerator-type joined over the data-center
                            network (Multislice, TPU v4 and later): NAME is a queued resource
                            with N nodes; set the mesh's dcn_* axes to match (default: 1)
  --create                  create the TPU VM (queued resource) if it does not exist; replace a
                            preempted, failed or suspended one
  --accelerator-type=TYPE   for --create: TYPE-SIZE with TYPE one of v6e, v5p, v5litepod (TPU
                            v5e), v4, v3, v2, e.g. v5p-64, v5litepod-16 [TPU_ACCELERATOR_TYPE]
  --version=VERSION         TPU software version for --create [TPU_RUNTIME_VERSION]; default from
                            the accelerator type: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                            v5litepod v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base
  --spot                    for --create: Spot TPU VMs
  --reserved                for --create: use the project's reserved capacity
  --network=NETWORK         for --create: VPC network (gcloud's default: default)
  --subnetwork=SUBNETWORK   for --create: subnetwork of --network
  --service-account=EMAIL   for --create: service account of the TPU VMs (it needs access to
                            the gs:// workdir and data)
  --git-url=URL             on every worker, git clone URL (and check out --git-ref) instead of
                            copying this checkout there [SSLM_GIT_URL]
  --git-ref=REF             branch, tag or commit for --git-url (default: the remote's HEAD)
  --skip-install            do not copy or install anything (DIR/.venv is already set up)
  --remote-dir=DIR          checkout directory on the workers, relative to the home directory
                            (default: sslm_jax)
  --jax=SPEC                JAX requirement installed on the workers (default: 'jax[tpu]')
  --python=VERSION          Python of the workers' virtual environment, $DEFAULT_PYTHON or newer
                            (default: $DEFAULT_PYTHON); uv downloads it when the TPU image lacks it
  --stop                    first stop the trainers running on the workers: SIGTERM, so they
                            save a checkpoint and exit (they hold the TPU; a new run fails while
                            they live). Without main.py flags: only stop.
  --no-follow               start the run and return without streaming its logs
  --logs                    do not start anything: stream the logs of the current (or last) run
                            until it ends
  --log-dir=DIR             write each worker's streamed log to DIR/<worker>.log on this machine
                            instead of printing it
  --internal-ip             connect to the workers over their internal IP addresses
  --delete                  delete the TPU VM (queued resource) at the end, once no trainer runs
                            on it, or when setting it up fails or is interrupted
  --dry-run                 print every command (gcloud and local) instead of running it
  -h, --help                show this help

Everything after '--' is passed to sslm_jax.main unchanged. Without it, the script only
prepares (with --stop, stops; with --delete, deletes) the TPU.

gcloud needs your SSH key in an agent to reach all workers: ssh-add ~/.ssh/google_compute_engine

Examples:
  # a v5p-64 slice: create it, train GPT-2 small, delete it when the run ends
  $PROG --name=sslm-v5p --zone=us-east5-a --accelerator-type=v5p-64 --create --delete -- \\
      --config=configs/gpt_base.py --workdir=gs://my-bucket/runs/gpt_base
  # follow that run again after closing the terminal
  $PROG --name=sslm-v5p --zone=us-east5-a --logs
  # two v5p-64 slices from reserved capacity, data parallel across the slices
  $PROG --name=sslm-ms --zone=us-east5-a --accelerator-type=v5p-64 --num-slices=2 --create \\
      --reserved -- --config=configs/gpt_base.py --workdir=gs://my-bucket/runs/gpt_base_2x \\
      --config.mesh.dcn_data=2
EOF
}

usage_error() {
  printf '%s: %s\n%s\n' "$PROG" "$*" "$USAGE_LINE" >&2
  exit 2
}

name=${TPU_NAME:-}
zone=${TPU_ZONE:-}
project=${TPU_PROJECT:-}
accelerator_type=${TPU_ACCELERATOR_TYPE:-}
runtime_version=${TPU_RUNTIME_VERSION:-}
git_url=${SSLM_GIT_URL:-}
git_ref=HEAD
remote_dir=sslm_jax
jax_spec='jax[tpu]'
python_version=$DEFAULT_PYTHON
num_slices=1
network=""
subnetwork=""
service_account=""
log_dir=""
create=0
spot=0
reserved=0
install=1
stop=0
follow=1
logs_only=0
internal_ip=0
delete=0
dry_run=0

set_option() {
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --project) project=$2 ;;
    --num-slices) num_slices=$2 ;;
    --accelerator-type) accelerator_type=$2 ;;
    --version) runtime_version=$2 ;;
    --network) network=$2 ;;
    --subnetwork) subnetwork=$2 ;;
    --service-account) service_account=$2 ;;
    --git-url) git_url=$2 ;;
    --git-ref) git_ref=$2 ;;
    --remote-dir) remote_dir=$2 ;;
    --jax) jax_spec=$2 ;;
    --python) python_version=$2 ;;
    --log-dir) log_dir=$2 ;;
  esac
}

VALUE_OPTIONS="--name --zone --project --num-slices --accelerator-type --version --network \
--subnetwork --service-account --git-url --git-ref --remote-dir --jax --python --log-dir"
takes_value() { [[ " $VALUE_OPTIONS " == *" $1 "* ]]; }

while (($#)); do
  case $1 in
    --)
      shift
      break
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --create) create=1 ;;
    --spot) spot=1 ;;
    --reserved) reserved=1 ;;
    --skip-install) install=0 ;;
    --stop) stop=1 ;;
    --no-follow) follow=0 ;;
    --logs) logs_only=1 ;;
    --internal-ip) internal_ip=1 ;;
    --delete) delete=1 ;;
    --dry-run) dry_run=1 ;;
    --*=*)
      takes_value "${1%%=*}" || usage_error "unknown option '${1%%=*}' (main.py flags go after --)."
      set_option "${1%%=*}" "${1#*=}"
      ;;
    *)
      takes_value "$1" || usage_error "unknown argument '$1' (main.py flags go after --)."
      (($# >= 2)) || usage_error "$1 needs a value."
      set_option "$1" "$2"
      shift
      ;;
  esac
  shift
done
trainer_args=("$@")

[[ -n $name ]] || usage_error "--name (or TPU_NAME) is required."
[[ -n $zone ]] || usage_error "--zone (or TPU_ZONE) is required."
if [[ ! $remote_dir =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$ ]]; then
  usage_error "--remote-dir must be a plain relative path such as sslm_jax, got '$remote_dir'."
fi
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || usage_error "--num-slices must be a positive integer."
if [[ ! $python_version =~ ^3\.([0-9]+)$ ]] || ((BASH_REMATCH[1] < 11)); then
  usage_error "--python must be a Python version $DEFAULT_PYTHON or newer, such as 3.12;" \
    "got '$python_version'."
fi
if ((spot && reserved)); then
  usage_error "--spot and --reserved are two different provisioning models; pass one."
fi
if ((!create)); then
  for flag in spot reserved network subnetwork service_account; do
    if [[ ${!flag} != 0 && -n ${!flag} ]]; then
      usage_error "--${flag//_/-} only applies with --create."
    fi
  done
fi
if ((logs_only)); then
  ((${#trainer_args[@]} == 0)) || usage_error "--logs starts nothing; drop the main.py flags."
  ((!create && !stop && follow)) || usage_error "--logs cannot be combined with --create," \
    "--stop or --no-follow."
  install=0
fi
if ((!follow && delete)); then
  usage_error "--delete waits for the run to end; it cannot be combined with --no-follow."
fi

# TYPE-SIZE, e.g. v5p-64. TPU v5e is the one family whose accelerator types use another name.
if [[ -n $accelerator_type ]]; then
  if [[ $accelerator_type =~ ^v5e-([0-9]+)$ ]]; then
    usage_error "'$accelerator_type' is not a Cloud TPU accelerator type: TPU v5e types are" \
      "named v5litepod-SIZE; use --accelerator-type=v5litepod-${BASH_REMATCH[1]}."
  fi
  if [[ ! $accelerator_type =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[1-9][0-9]*$ ]]; then
    # A newer family is accepted when its software version is given.
    if [[ -z $runtime_version || ! $accelerator_type =~ ^[a-z0-9]+-[1-9][0-9]*$ ]]; then
      usage_error "unknown accelerator type '$accelerator_type': expected v6e-, v5p-," \
        "v5litepod- (TPU v5e), v4-, v3- or v2- and a size, e.g. v5p-64."
    fi
  fi
  if ((num_slices > 1)) && [[ $accelerator_type =~ ^v[23]- ]]; then
    usage_error "Multislice (--num-slices>1) needs TPU v4 or later, not '$accelerator_type'."
  fi
fi
if ((create)); then
  [[ -n $accelerator_type ]] || usage_error "--create needs --accelerator-type (e.g. v5p-64)."
  if [[ -z $runtime_version ]]; then
    case $accelerator_type in
      v6e-*) runtime_version=v2-alpha-tpuv6e ;;
      v5p-*) runtime_version=v2-alpha-tpuv5 ;;
      v5litepod-*) runtime_version=v2-alpha-tpuv5-lite ;;
      v2-* | v3-* | v4-*) runtime_version='tpu-ubuntu2204-base' ;;
    esac
  fi
fi

# The workers do not share a disk: a local workdir would give each one its own checkpoints.
for ((i = 0; i < ${#trainer_args[@]}; i++)); do
  arg=${trainer_args[i]}
  workdir=""
  case $arg in
    --workdir=*) workdir=${arg#--workdir=} ;;
    --workdir) workdir=${trainer_args[i + 1]:-} ;;
  esac
  if [[ -n $workdir && $workdir != gs://* ]]; then
    printf '%s: warning: --workdir=%s is not a gs:// path; on a multi-host slice every worker\n' \
      "$PROG" "$workdir" >&2
    printf '%s: warning: must see the same workdir (use gs://BUCKET/... or a shared mount).\n' \
      "$PROG" >&2
  fi
done

# One slice is a TPU VM; several are the nodes NAME-0, NAME-1, ... of one queued resource.
location=("--zone=$zone")
if [[ -n $project ]]; then
  location+=("--project=$project")
fi
if ((num_slices > 1)); then
  tpu=(gcloud compute tpus queued-resources)
  what="queued resource"
  connect=(--node=all --worker=all)
else
  tpu=(gcloud compute tpus tpu-vm)
  what="TPU VM"
  connect=(--worker=all)
fi
if ((internal_ip)); then
  connect+=(--internal-ip)
fi
delete_cmd=("${tpu[@]}" delete "$name" "${location[@]}" --quiet)
if ((num_slices > 1)); then
  delete_cmd+=(--force) # delete the slices (nodes) with the request
fi

# Print a command as one line that a shell would read back as the same words.
show() {
  local arg line="" sq="'" esc="'\\''"
  for arg in "$@"; do
    if [[ ! $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      arg="'${arg//$sq/$esc}'"
    fi
    line+="$arg "
  done
  printf '%s\n' "${line% }"
}

# Run a command, or only print it under --dry-run.
step() {
  if ((dry_run)); then
    show "$@"
  else
    printf '+ %s\n' "$(show "$@")" >&2
    "$@"
  fi
}

# Run a shell command on every worker (of every slice); extra gcloud flags may follow it.
on_all_workers() {
  local command=$1
  shift
  step "${tpu[@]}" ssh "$name" "${location[@]}" "${connect[@]}" "$@" --quiet "--command=$command"
}

note() {
  if ((!dry_run)); then
    printf '%s: %s\n' "$PROG" "$*" >&2
  fi
}

tmp_dir=""
delete_armed=0
run_started=0
run_ended=0
finish() {
  local status=$?
  trap '' INT TERM
  if ((delete_armed)); then
    if ((run_started && !run_ended)); then
      printf '%s: the run may still be going on %s %s, so it is not deleted. Follow it with\n' \
        "$PROG" "$what" "$name" >&2
      printf '%s: --logs (add --delete to delete it when the run ends), or delete it with:\n' \
        "$PROG" >&2
      printf '%s:   %s\n' "$PROG" "$(show "${delete_cmd[@]}")" >&2
    else
      note "deleting $what $name."
      step "${delete_cmd[@]}" ||
        printf '%s: warning: could not delete %s %s; delete it by hand.\n' "$PROG" "$what" \
          "$name" >&2
    fi
  fi
  if [[ -n $tmp_dir ]]; then
    rm -rf "$tmp_dir"
  fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ((!dry_run)); then
  command -v gcloud >/dev/null || {
    printf '%s: gcloud not found; install the Google Cloud CLI.\n' "$PROG" >&2
    exit 1
  }
  if [[ -n $log_dir ]]; then
    mkdir -p "$log_dir"
  fi
fi

# 1. Find or create the TPU VM (or the queued resource), and wait until it can be used.
provisioning=()
if ((spot)); then
  provisioning+=(--spot)
fi
if ((reserved)); then
  provisioning+=(--reserved)
fi
if [[ -n $network ]]; then
  provisioning+=("--network=$network")
fi
if [[ -n $subnetwork ]]; then
  provisioning+=("--subnetwork=$subnetwork")
fi
if [[ -n $service_account ]]; then
  provisioning+=("--service-account=$service_account")
fi
if ((num_slices > 1)); then
  create_cmd=("${tpu[@]}" create "$name" "${location[@]}" "--accelerator-type=$accelerator_type"
    "--runtime-version=$runtime_version" "--node-count=$num_slices" "--node-prefix=$name"
    ${provisioning[@]+"${provisioning[@]}"} --quiet)
  describe_cmd=("${tpu[@]}" describe "$name" "${location[@]}" '--format=value(state.state)')
  ready_state=ACTIVE
  broken_states=" FAILED SUSPENDING SUSPENDED "
  broken_words="FAILED or SUSPENDED"
else
  create_cmd=("${tpu[@]}" create "$name" "${location[@]}" "--accelerator-type=$accelerator_type"
    "--version=$runtime_version" ${provisioning[@]+"${provisioning[@]}"} --quiet)
  describe_cmd=("${tpu[@]}" describe "$name" "${location[@]}" '--format=value(state)')
  ready_state=READY
  broken_states=" PREEMPTED TERMINATED "
  broken_words="PREEMPTED or TERMINATED"
fi

# Poll until the TPU reaches ready_state; a queued resource may wait long for capacity.
wait_until_ready() {
  local state last=""
  while :; do
    state=$("${describe_cmd[@]}" 2>/dev/null) || state=""
    [[ $state == "$ready_state" ]] && return 0
    if [[ -n $state && $broken_states == *" $state "* ]]; then
      printf '%s: %s %s is %s.\n' "$PROG" "$what" "$name" "$state" >&2
      exit 1
    fi
    if [[ $state != "$last" ]]; then
      note "$what $name is ${state:-not visible yet}; waiting until it is $ready_state" \
        "(checking every ${POLL_SECONDS}s; Ctrl-C stops waiting)."
      last=$state
    fi
    sleep "$POLL_SECONDS"
  done
}

if ((logs_only)); then
  : # only the logs of a run that is already there
elif ((dry_run)); then
  show "${describe_cmd[@]}"
  if ((create)); then
    echo "# only if the $what does not exist (or is $broken_words: deleted first):"
    show "${create_cmd[@]}"
  fi
  echo "# repeat every ${POLL_SECONDS}s until the state is $ready_state:"
  show "${describe_cmd[@]}"
else
  state=$("${describe_cmd[@]}" 2>/dev/null) || state=""
  if [[ -z $state ]]; then
    ((create)) || {
      printf '%s: %s %s not found in %s; pass --create to create it.\n' "$PROG" "$what" "$name" \
        "$zone" >&2
      exit 1
    }
    note "creating $what $name ($num_slices x $accelerator_type, $runtime_version)."
    delete_armed=$delete
    step "${create_cmd[@]}"
  else
    note "found $what $name (state $state)."
    if [[ $broken_states == *" $state "* ]]; then
      ((create)) || {
        printf '%s: %s %s is %s. --create replaces it; otherwise delete it.\n' "$PROG" "$what" \
          "$name" "$state" >&2
        exit 1
      }
      step "${delete_cmd[@]}"
      delete_armed=$delete
      step "${create_cmd[@]}"
    fi
  fi
  wait_until_ready
fi
delete_armed=$delete

# 2. Stop the trainers of an earlier run: SIGTERM, so that each saves a checkpoint and exits.
if ((stop)); then
  on_all_workers "pkill -TERM -f -- '$TRAINER_PATTERN'; for i in \$(seq 300); do \
pgrep -f -- '$TRAINER_PATTERN' >/dev/null || exit 0; sleep 1; done; \
echo \"\$(hostname): the trainer did not stop within 300 s\" >&2; exit 1"
fi

# 3. Put the code on every worker and install it into a virtual environment made by uv: the TPU
# images' own python3 may be older than jax needs.
q_dir=$(printf '%q' "$remote_dir")
q_jax=$(printf '%q' "$jax_spec")
install_cmd="export PATH=\"\$HOME/.local/bin:\$PATH\" && \
{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; } && cd $q_dir && \
{ [ -x .venv/bin/python$python_version ] || { rm -rf .venv && uv venv -q --python \
$python_version .venv; }; } && uv pip install -q --python .venv/bin/python -U $q_jax -e ."
if ((install)) && [[ -n $git_url ]]; then
  on_all_workers "{ [ -d $q_dir/.git ] || git clone -q $(printf '%q' "$git_url") $q_dir; } && \
git -C $q_dir fetch -q origin $(printf '%q' "$git_ref") && \
git -C $q_dir checkout -q --force FETCH_HEAD && $install_cmd"
elif ((install)); then
  tarball_name=sslm_jax_src.tar.gz
  if ((dry_run)); then
    tarball="${TMPDIR:-/tmp}/$tarball_name"
    echo "# pack the files git tracks or does not ignore, uncommitted changes included:"
    echo "$(show git -C "$REPO_ROOT" ls-files -z -co --exclude-standard) |" \
      "$(show tar -C "$REPO_ROOT" --null -T - -czf "$tarball")"
  else
    tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/sslm_tpu.XXXXXX")
    tarball="$tmp_dir/$tarball_name"
    if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git -C "$REPO_ROOT" ls-files -z -co --exclude-standard |
        while IFS= read -r -d '' file; do
          if [[ -e $REPO_ROOT/$file ]]; then printf '%s\0' "$file"; fi
        done |
        COPYFILE_DISABLE=1 tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
    else
      COPYFILE_DISABLE=1 tar -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=runs \
        --exclude='*.egg-info' --exclude=__pycache__ -czf "$tarball" .
    fi
  fi
  step "${tpu[@]}" scp "$tarball" "$name:$tarball_name" "${location[@]}" "${connect[@]}" --quiet
  on_all_workers "mkdir -p $q_dir && tar -xzf $tarball_name -C $q_dir && rm -f $tarball_name && \
$install_cmd"
fi

# 4. Start the trainer on every worker, detached: in its own session (setsid), immune to the
# hangup of this ssh connection (nohup), output in logs/train.log. Its 'sh -c' wrapper records its
# pid and, at the end, the trainer's exit status for the log stream.
if ((${#trainer_args[@]})); then
  quoted_args=$(printf ' %q' "${trainer_args[@]}")
  # shellcheck disable=SC2016  # expanded on the workers
  wrapper='echo $$ > logs/train.pid; "$@"; echo $? > logs/train.exit'
  run_started=1 # from here on, --delete waits until no trainer runs (even if this step fails)
  on_all_workers "set -e; cd $q_dir; mkdir -p logs; pid=\$(cat logs/train.pid 2>/dev/null || true); \
if [ -n \"\$pid\" ] && grep -qs sslm_jax /proc/\$pid/cmdline; then echo \"\$(hostname): a trainer \
is still running (pid \$pid); stop it with --stop or follow it with --logs.\" >&2; exit 1; fi; \
if [ -e logs/train.log ]; then mv logs/train.log logs/train.\$(date +%Y%m%d-%H%M%S).log; fi; \
rm -f logs/train.pid logs/train.exit; TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1 setsid nohup \
sh -c '$wrapper' sh .venv/bin/python -m sslm_jax.main$quoted_args > logs/train.log 2>&1 \
< /dev/null & for i in \$(seq 100); do [ -s logs/train.pid ] && break; sleep 0.1; done; \
pid=\$(cat logs/train.pid); echo \"\$(hostname): trainer started, pid \$pid, log ~/$q_dir/logs/train.log\""
elif ((!dry_run && !logs_only && !stop)); then
  printf '%s: no main.py flags after --; nothing to run.\n' "$PROG" >&2
fi

# 5. Stream every worker's log until its trainer exits; end with the trainer's exit status.
# Interrupting the stream (or losing the connection) leaves the run alone.
if ((follow && (run_started || logs_only))); then
  run_started=1
  extra=()
  if [[ -n $log_dir ]]; then
    extra=("--output-directory=$log_dir")
  fi
  # shellcheck disable=SC2016  # expanded on the workers
  if ((num_slices > 1)); then
    prefix='[$h] ' # the worker numbers repeat from slice to slice
  else
    prefix='[worker ${h##*-w-}] '
  fi
  status=0
  on_all_workers "cd $q_dir || exit 1; h=\$(hostname); p=\"$prefix\"; if [ ! -e logs/train.log ]; \
then echo \"\${p}no run log in ~/$q_dir/logs\" >&2; exit 1; fi; \
pid=\$(cat logs/train.pid 2>/dev/null || true); \
if [ -n \"\$pid\" ] && grep -qs sslm_jax /proc/\$pid/cmdline; then tail -n +1 --pid=\"\$pid\" -F logs/train.log; else cat logs/train.log; fi \
| sed -u \"s/^/\$p/\"; if [ -s logs/train.exit ]; then exit \"\$(cat logs/train.exit)\"; fi; \
echo \"\${p}the trainer ended without an exit status (killed?)\" >&2; exit 1" \
    ${extra[@]+"${extra[@]}"} || status=$?
  # The stream also ends when the connection drops: delete only what no trainer runs on.
  if ((delete)); then
    if on_all_workers "! pgrep -f -- '$TRAINER_PATTERN' >/dev/null"; then
      run_ended=1
    fi
  fi
  exit "$status"
elif ((run_started)); then
  echo "# the run goes on; follow its logs with:"
  follow_cmd=("$REPO_ROOT/launch/$PROG" "--name=$name" "--zone=$zone")
  if [[ -n $project ]]; then
    follow_cmd+=("--project=$project")
  fi
  if ((num_slices > 1)); then
    follow_cmd+=("--num-slices=$num_slices")
  fi
  follow_cmd+=(--logs)
  show "${follow_cmd[@]}"
fi
