#!/usr/bin/env bash
# Run the trainer on every worker of a Cloud TPU VM slice (one host or a whole pod) with gcloud.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USAGE_LINE="Usage: $PROG --name=NAME --zone=ZONE [options] [-- main.py flags...]"

usage() {
  cat <<EOF
$USAGE_LINE

Runs 'python3 -m sslm_jax.main <main.py flags>' on all workers of the Cloud TPU VM NAME at once
(gcloud compute tpus tpu-vm ssh --worker=all), streaming every worker's output prefixed with
'[worker N] '. On a TPU VM the processes find each other by themselves; no extra flags are needed.
Steps, in order: find (or with --create, create) the TPU VM; copy this checkout to every worker
(or clone --git-url there) and pip install it with jax[tpu]; run; with --delete, delete the VM.

The workdir must be storage that every worker sees: use a gs:// path on a pod, e.g.
--workdir=gs://BUCKET/runs/NAME (the workers' service account needs write access to the bucket).
Rerunning the same command resumes from the newest checkpoint in the workdir.

Options (each can also be given by the environment variable in brackets):
  --name=NAME               TPU VM name [TPU_NAME]; required
  --zone=ZONE               zone, e.g. us-east5-a [TPU_ZONE]; required
  --project=PROJECT         Google Cloud project [TPU_PROJECT] (default: gcloud's configured one)
  --create                  create the TPU VM if it does not exist (reuse it if it does)
  --accelerator-type=TYPE   for --create, e.g. v5p-64, v5litepod-16, v6e-8, v4-32
                            [TPU_ACCELERATOR_TYPE]
  --version=VERSION         TPU software version for --create [TPU_RUNTIME_VERSION]; default from
                            the accelerator type: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                            v5litepod/v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base
  --spot                    with --create, create a Spot TPU VM
  --git-url=URL             on every worker, git clone URL (and check out --git-ref) instead of
                            copying this checkout there [SSLM_GIT_URL]
  --git-ref=REF             branch, tag or commit for --git-url (default: the remote's HEAD)
  --skip-install            do not copy or install anything (the workers are already set up)
  --remote-dir=DIR          checkout directory on the workers, relative to the home directory
                            (default: sslm_jax)
  --jax=SPEC                JAX requirement installed on the workers (default: 'jax[tpu]')
  --python=PYTHON           Python on the workers (default: python3)
  --stop                    first stop trainer processes that an earlier run left on the workers
                            (they hold the TPU, and a new run fails while they live)
  --log-dir=DIR             write each worker's output to DIR/<worker>.log instead of streaming it
  --internal-ip             connect to the workers over their internal IP addresses
  --delete                  delete the TPU VM at the end, also when the run fails or is interrupted
  --dry-run                 print every command (gcloud and local) instead of running it
  -h, --help                show this help

Everything after '--' is passed to sslm_jax.main unchanged. Without it, the script only
prepares (and with --delete, deletes) the TPU VM.

gcloud needs your SSH key in an agent to reach all workers: ssh-add ~/.ssh/google_compute_engine

Example: create a v5p-64 slice, train GPT-2 small on it, delete it at the end:
  $PROG --name=sslm-v5p --zone=us-east5-a --accelerator-type=v5p-64 --create --delete -- \\
      --config=configs/gpt_base.py --workdir=gs://my-bucket/runs/gpt_base
EOF
}

usage_error() {
  printf '%s: %s\n%s\n' "$PROG" "$1" "$USAGE_LINE" >&2
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
remote_python=python3
log_dir=""
create=0
spot=0
install=1
stop=0
internal_ip=0
delete=0
dry_run=0

set_option() {
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --project) project=$2 ;;
    --accelerator-type) accelerator_type=$2 ;;
    --version) runtime_version=$2 ;;
    --git-url) git_url=$2 ;;
    --git-ref) git_ref=$2 ;;
    --remote-dir) remote_dir=$2 ;;
    --jax) jax_spec=$2 ;;
    --python) remote_python=$2 ;;
    --log-dir) log_dir=$2 ;;
  esac
}

VALUE_OPTIONS="--name --zone --project --accelerator-type --version --git-url --git-ref \
--remote-dir --jax --python --log-dir"
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
    --skip-install) install=0 ;;
    --stop) stop=1 ;;
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
if ((create)); then
  [[ -n $accelerator_type ]] || usage_error "--create needs --accelerator-type (e.g. v5p-64)."
  if [[ -z $runtime_version ]]; then
    case $accelerator_type in
      v6e-*) runtime_version=v2-alpha-tpuv6e ;;
      v5p-*) runtime_version=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) runtime_version=v2-alpha-tpuv5-lite ;;
      v2-* | v3-* | v4-*) runtime_version='tpu-ubuntu2204-base' ;;
      *) usage_error "no default --version for accelerator type '$accelerator_type'; pass one." ;;
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

tpu=(gcloud compute tpus tpu-vm)
location=("--zone=$zone")
if [[ -n $project ]]; then
  location+=("--project=$project")
fi
connect=(--worker=all)
if ((internal_ip)); then
  connect+=(--internal-ip)
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

on_all_workers() {
  local extra=()
  if [[ -n $log_dir ]]; then
    extra=("--output-directory=$log_dir")
  fi
  step "${tpu[@]}" ssh "$name" "${location[@]}" "${connect[@]}" ${extra[@]+"${extra[@]}"} \
    --quiet "--command=$1"
}

tmp_dir=""
delete_armed=0
finish() {
  local status=$?
  trap '' INT TERM
  if ((delete_armed)); then
    if ((!dry_run)); then
      printf '%s: deleting TPU VM %s.\n' "$PROG" "$name" >&2
    fi
    step "${tpu[@]}" delete "$name" "${location[@]}" --quiet ||
      printf '%s: warning: could not delete TPU VM %s; delete it by hand.\n' "$PROG" "$name" >&2
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

# 1. Find or create the TPU VM.
create_cmd=("${tpu[@]}" create "$name" "${location[@]}" "--accelerator-type=$accelerator_type"
  "--version=$runtime_version" --quiet)
if ((spot)); then
  create_cmd+=(--spot)
fi
describe_cmd=("${tpu[@]}" describe "$name" "${location[@]}" '--format=value(state)')
if ((dry_run)); then
  show "${describe_cmd[@]}"
  if ((create)); then
    echo "# only if the TPU VM does not exist:"
    show "${create_cmd[@]}"
  fi
else
  state=$("${describe_cmd[@]}" 2>/dev/null) || state=""
  if [[ -z $state ]]; then
    ((create)) || {
      printf '%s: TPU VM %s not found in %s; pass --create to create it.\n' "$PROG" "$name" \
        "$zone" >&2
      exit 1
    }
    printf '%s: creating TPU VM %s (%s, %s).\n' "$PROG" "$name" "$accelerator_type" \
      "$runtime_version" >&2
    delete_armed=$delete
    step "${create_cmd[@]}"
  else
    printf '%s: found TPU VM %s (state %s).\n' "$PROG" "$name" "$state" >&2
    if [[ $state != READY ]]; then
      if ((create)) && [[ $state == PREEMPTED || $state == TERMINATED ]]; then
        step "${tpu[@]}" delete "$name" "${location[@]}" --quiet
        delete_armed=$delete
        step "${create_cmd[@]}"
      else
        printf '%s: TPU VM %s is %s, not READY. A PREEMPTED or TERMINATED one is replaced\n' \
          "$PROG" "$name" "$state" >&2
        printf '%s: by --create; otherwise wait, or delete it.\n' "$PROG" >&2
        exit 1
      fi
    fi
  fi
fi
delete_armed=$delete

# 2. Stop leftovers of an earlier run. The pattern cannot match the shell that runs pkill.
if ((stop)); then
  on_all_workers "pkill -f -- '-m [s]slm_jax[.]main' && sleep 5; true"
fi

# 3. Put the code on every worker and install it.
install_cmd="cd $(printf '%q' "$remote_dir") && $remote_python -m pip install -q -U $(printf '%q' \
  "$jax_spec") && $remote_python -m pip install -q -e ."
if ((install)) && [[ -n $git_url ]]; then
  q_dir=$(printf '%q' "$remote_dir")
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
  q_dir=$(printf '%q' "$remote_dir")
  on_all_workers "mkdir -p $q_dir && tar -xzf $tarball_name -C $q_dir && rm -f $tarball_name && \
$install_cmd"
fi

# 4. Run the trainer on all workers at once.
if ((${#trainer_args[@]})); then
  quoted_args=$(printf ' %q' "${trainer_args[@]}")
  # shellcheck disable=SC2016  # expanded on the workers
  prefix='h=$(hostname) && sed -u "s/^/[worker ${h##*-w-}] /"'
  on_all_workers "set -o pipefail; cd $(printf '%q' "$remote_dir") && \
TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1 $remote_python -m sslm_jax.main$quoted_args 2>&1 \
| { $prefix; }"
elif ((!dry_run)); then
  printf '%s: no main.py flags after --; nothing to run.\n' "$PROG" >&2
fi
