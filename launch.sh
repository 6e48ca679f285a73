#!/usr/bin/env bash
# Tessera's front door: environment setup, tests, the demo, and (as they land) job launches.
# Knobs are environment variables with defaults; see `./launch.sh --help`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"                       # interpreter used to create the virtualenv
VENV="${VENV:-$ROOT/.venv}"                       # virtualenv location (created or reused)
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"         # torch requirement installed before everything else
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"            # e.g. https://download.pytorch.org/whl/cpu for CPU wheels
EXTRAS="${EXTRAS:-test}"                          # project extras: test, gpu (xformers, CUDA only)
LINT="${LINT:-1}"                                 # 1: `test` runs ruff before pytest
# ops DeepSpeed compiles go with the virtualenv, so that two checkouts on one machine do not rebuild
# each other's
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"

usage() {
  cat <<'EOF'
Usage: ./launch.sh COMMAND [ARGS...]

Commands:
  setup              create or reuse the virtualenv (.venv) and install Tessera and its dependencies
  test [PYTEST...]   setup, ruff, then the test suite (CPU; GPU tests skip without CUDA)
  lint               ruff check and format check
  demo [key=value...] the end-to-end job on the embedded default (configs/pipeline/demo.yaml): synthetic
                     data, preprocessing, base + TSR + SSR training, rendering, report in runs/demo/
  run CONFIG [key=value...] [--from|--only|--force STAGE] [--plan] [--address ADDR]
                     an end-to-end pipeline (configs/pipeline/*.yaml); rerun to resume or skip
  status RUN_DIR     each stage of a pipeline run: state, time, outputs
  preprocess INPUT... --out DIR [key=value...]   dataset preprocessing job (Ray Data; --local without Ray)
  synth --out DIR --count N   synthetic captioned videos and images
  train CONFIG [key=value...] [--resume auto|none|DIR]
                     training on this machine (all GPUs, or NPROC_PER_NODE CPU processes), on several
                     machines (NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT, or HOSTFILE for the DeepSpeed
                     launcher); `./launch.sh python -m pipeline train CONFIG --ray` runs it on Ray Train
  slurm [SBATCH-OPTION...] -- CONFIG [key=value...]   submit configs/slurm/train.sbatch (its 8-GPU lines
                     are defaults: e.g. --gpus-per-node=0 --cpus-per-task=1 on CPU nodes); creates runs/
                     and prints the job's output file; a SIGTERM'd job checkpoints and is requeued
  ray-head [RAY-START-OPTION...]   start a Ray head here (dashboard on 127.0.0.1 unless RAY_DASHBOARD_HOST
                     is set; --node-ip-address=127.0.0.1 keeps the cluster on loopback, for one machine)
  ray-worker HEAD_ADDRESS [RAY-START-OPTION...]   join this machine to a Ray cluster (a 127.0.0.1
                     address joins on loopback); auth as the head's: RAY_AUTH_MODE, else token if one exists
  render --cascade FILE (--prompts FILE | --prompt TEXT...) --out DIR [--seed N] [--batch-size N] [--local]
                     offline rendering through a cascade (one Ray actor per stage; --plan [--json] prints
                     the stages' shapes and costs without loading weights); rerun the same command to resume
  upscale INPUT --cascade FILE --from-stage NAME --out DIR [--prompt TEXT]
                     take a video through a cascade's super-resolution stages from NAME on
  python ARGS...     run the virtualenv's python (e.g. ./launch.sh python -m pipeline --help)

Environment knobs (defaults in brackets):
  PYTHON [python3]  VENV [.venv]  TORCH_SPEC [torch==2.13.0]  TORCH_INDEX_URL []
  EXTRAS [test]  LINT [1]
  train: NPROC_PER_NODE [GPUs, or 1 without]  NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]
         MASTER_PORT [29500]  OMP_NUM_THREADS [CPUs / training processes on this machine]
         HOSTFILE [] (DeepSpeed launcher over ssh/pdsh; with it: MASTER_ADDR [first host's `hostname -I`]
         SSH_PORT [ssh's own]  DS_ENV_FILE [~/.deepspeed_env, ./.deepspeed_env])
  ray-head: RAY_PORT [6379]  RAY_DASHBOARD_HOST [127.0.0.1]
Extra arguments to `test` go to pytest, e.g. the fast tier: ./launch.sh test -m "not slow and not integration"

On a CPU-only machine the CPU torch build is installed first so nothing pulls CUDA wheels: set
TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where the plain index would give a CUDA build.
DeepSpeed is built against that torch with --no-build-isolation. On CUDA machines, EXTRAS=test,gpu adds
xformers.
EOF
}

die() { echo "launch.sh: $*" >&2; exit 2; }

venv_python() { echo "$VENV/bin/python"; }

setup() {
  "$PYTHON" - <<'EOF' || die "Python >= 3.10 is required (set PYTHON=/path/to/python3.10+)"
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF
  if [[ ! -x "$(venv_python)" ]]; then
    echo "[setup] creating virtualenv in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local py stamp want
  py="$(venv_python)"
  stamp="$VENV/.tessera-install"
  # reinstall when the dependencies or this function change, not when another command of this file does
  want="$({ cat "$ROOT/pyproject.toml"; declare -f setup; } | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "[setup] installing dependencies into $VENV (first run takes a few minutes)"
  "$py" -m pip install --quiet --upgrade pip setuptools wheel
  local index=()
  [[ -n "$TORCH_INDEX_URL" ]] && index=(--index-url "$TORCH_INDEX_URL")
  "$py" -m pip install --quiet "${index[@]}" "$TORCH_SPEC" numpy
  # DeepSpeed's build imports torch: build it against the torch above instead of an isolated (CUDA) one.
  "$py" -m pip install --quiet --no-build-isolation deepspeed
  "$py" -m pip install --quiet -e "$ROOT[$EXTRAS]"
  "$py" -c "import torch, deepspeed, ray, decord, av, webdataset; print('[setup] torch', torch.__version__, \
'cuda' if torch.cuda.is_available() else 'cpu', '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)" \
    2>/dev/null | grep '^\[setup\]' || die "dependency check failed; rerun with a clean $VENV"
  # Training builds no op at run time on CPU (stages/train/ops.py); on CUDA DeepSpeed's fused Adam is
  # compiled the first time a training uses it. Build it now, once, so no training waits on that build
  # (on CPU only DeepSpeed's own fused Adam, `"torch_adam": false`, and its equivalence test use it).
  # Best effort: DeepSpeed skips ops a machine does not support.
  "$py" - >/dev/null 2>&1 <<'EOF' || true
import deepspeed.ops
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("FusedAdamBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load()
EOF
  echo "$want" > "$stamp"
}

lint() {
  local py
  py="$(venv_python)"
  (cd "$ROOT" && "$py" -m ruff check . && "$py" -m ruff format --check .)
}

# OMP threads of each training process when the user set none: this machine's CPUs (`nproc`, which
# honours affinity and cgroup limits) over the training processes it runs, NPROC_PER_NODE, times NNODES
# when MASTER_ADDR is a loopback address (every node is then on this machine). torchrun itself only sets 1,
# and only for NPROC_PER_NODE > 1; with one process per node nothing did and nodes sharing a machine
# oversubscribed it.
omp_threads() {
  local procs=$1 nodes=$2 cpus
  cpus="$(nproc 2>/dev/null || echo 1)"
  case "${MASTER_ADDR:-127.0.0.1}" in
    127.* | localhost | ::1) procs=$((procs * nodes)) ;;
  esac
  echo $((cpus / procs > 0 ? cpus / procs : 1))
}

# The DeepSpeed launcher over ssh/pdsh to every host of HOSTFILE. The remote side gets TORCH_EXTENSIONS_DIR,
# the virtualenv's PATH and OMP_NUM_THREADS (when set) through a DS_ENV_FILE that also carries the user's
# own ~/.deepspeed_env and ./.deepspeed_env lines (DeepSpeed itself forwards PYTHON* variables).
train_hostfile() {
  local bin="$VENV/bin" envfile
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE: $HOSTFILE is not a file (expected lines 'HOST slots=N')"
  envfile="$(mktemp "${TMPDIR:-/tmp}/tessera-ds-env.XXXXXX")"
  trap "rm -f '$envfile'" EXIT  # expanded now: the local is gone when the trap runs
  {
    local name="${DS_ENV_FILE:-.deepspeed_env}"  # where DeepSpeed looks: ~/NAME and ./NAME
    [[ -f "$HOME/$name" ]] && cat "$HOME/$name"
    [[ -f "$name" && "$PWD" != "$HOME" ]] && cat "$name"
    echo "TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"
    echo "PATH=$bin:$PATH"
    [[ -n "${OMP_NUM_THREADS:-}" ]] && echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
    true
  } > "$envfile"
  local opts=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
  [[ -n "${MASTER_ADDR:-}" ]] && opts+=(--master_addr "$MASTER_ADDR")
  [[ -n "${SSH_PORT:-}" ]] && opts+=(--ssh_port "$SSH_PORT")
  DS_ENV_FILE="$envfile" "$bin/deepspeed" "${opts[@]}" --module pipeline train "$@"
}

train() {
  setup
  local bin="$VENV/bin"
  if [[ -n "${HOSTFILE:-}" ]]; then  # DeepSpeed launcher: ssh/pdsh to every host of the hostfile
    train_hostfile "$@"
    return
  fi
  local nproc="${NPROC_PER_NODE:-}"
  if [[ -z "$nproc" ]]; then
    nproc="$("$bin/python" -c 'import torch; print(torch.cuda.device_count() or 1)')"
  fi
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(omp_threads "$nproc" "${NNODES:-1}")}"
  # torchrun whose rendezvous store listens on MASTER_ADDR only (stages/train/torchrun.py)
  exec "$bin/python" -m stages.train.torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --nproc_per_node "$nproc" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m pipeline train "$@"
}

slurm() {
  local opts=() output="runs/slurm-%j.out"  # the sbatch's --output, unless an option overrides it
  while [[ $# -gt 0 && "$1" != "--" ]]; do
    case "$1" in
      --output=*) output="${1#--output=}" ;;
      -o?*) output="${1#-o}" ;;
      --output | -o) [[ $# -gt 1 ]] && output="$2" ;;
    esac
    opts+=("$1")
    shift
  done
  [[ "${1:-}" == "--" ]] && shift
  [[ $# -gt 0 ]] || die "usage: ./launch.sh slurm [SBATCH-OPTION...] -- CONFIG [key=value...]"
  command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
  setup
  # slurmd opens the output file before the job starts: in a missing folder the job fails at once and
  # writes nothing anywhere the user looks
  local folder
  folder="$(dirname "$output")"
  if [[ "$folder" != *%* ]]; then
    mkdir -p "$folder" 2>/dev/null && [[ -w "$folder" ]] || die "cannot write the job's output folder $folder"
  fi
  local job
  job="$(TESSERA_PYTHON="$(venv_python)" sbatch --parsable "${opts[@]}" "$ROOT/configs/slurm/train.sbatch" \
    "$@")"
  job="${job%%;*}"
  echo "Submitted batch job $job"
  echo "output: ${output//%j/$job}"
}

demo() {
  setup
  cd "$ROOT"
  local start=$SECONDS
  "$(venv_python)" -m pipeline run configs/pipeline/demo.yaml "$@"
  echo "[demo] $((SECONDS - start)) s after setup"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  setup) setup ;;
  test)
    setup
    [[ "$LINT" == "1" ]] && lint
    cd "$ROOT"
    "$(venv_python)" -m pytest tests "$@"
    ;;
  lint) setup; lint ;;
  python) setup; exec "$(venv_python)" "$@" ;;
  demo) demo "$@" ;;
  preprocess | synth | run | status) setup; exec "$(venv_python)" -m pipeline "$cmd" "$@" ;;
  train) train "$@" ;;
  slurm) slurm "$@" ;;
  ray-head)  # pipeline/ray_start.py: `ray start`, kept on loopback with --node-ip-address=127.0.0.1
    setup
    exec "$(venv_python)" -m pipeline.ray_start --head --port "${RAY_PORT:-6379}" \
      --dashboard-host "${RAY_DASHBOARD_HOST:-127.0.0.1}" "$@"
    ;;
  ray-worker)
    [[ $# -ge 1 ]] || die "usage: ./launch.sh ray-worker HEAD_ADDRESS [RAY-START-OPTION...] (host:port of ray-head)"
    setup
    exec "$(venv_python)" -m pipeline.ray_start --address "$@"
    ;;
  render | upscale) setup; exec "$(venv_python)" -m pipeline "$cmd" "$@" ;;
  -h | --help | help) usage ;;
  "") usage; exit 2 ;;
  *) usage >&2; die "unknown command '$cmd'" ;;
esac
