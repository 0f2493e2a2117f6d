#!/usr/bin/env bash
# The shipped models on a GPU machine, in under 5 minutes:
#   1. install the project and onnxruntime-gpu (from the wheels given, or from the registry)
#      into a virtual environment that sees the machine's own packages (CUDA, cuDNN, numpy);
#   2. check that ONNX Runtime runs a session on CUDA (session.get_providers() starts with
#      CUDAExecutionProvider), and say so loudly when it does not;
#   3. benchmarks/gpu.py: slices/s of both models with the CUDA provider (fp32) and the
#      TensorRT provider (fp16), run() and IO binding, at batch sizes 1 to 64, and the CPU;
#   4. benchmarks/turnaround.py: the 300-slice study turnaround with inference on the GPU.
#
#   benchmarks/gpu.sh                                  # registry install, everything
#   benchmarks/gpu.sh --wheels /tmp/wheels             # offline, from these wheels
#   benchmarks/gpu.sh --no-install --python .venv/bin/python \
#       --providers "cuda tensorrt cpu" --batch-sizes "1 4 16" --repeat 2 --turnaround-repeat 1
#                                                      # a CPU machine: what it can do
#
# Options (defaults in brackets):
#   --python PY            interpreter to install for / run with [python3]
#   --wheels DIR           install offline from DIR (onnxruntime-gpu, dicomnode or its
#                          dependencies as wheels) [registry]
#   --venv DIR             where the virtual environment goes [a temporary folder]
#   --no-install           run with --python as it is (the project already installed)
#   --providers "..."      providers for the sweep, any of cuda tensorrt cpu ["cuda tensorrt cpu"]
#   --batch-sizes "..."    ["1 2 4 8 16 32 64"]
#   --repeat N             timed rounds per point [3]
#   --turnaround-slices N  study size for the turnaround, 0 to skip it [300]
#   --turnaround-repeat N  [3]
#   --turnaround-batch N   slices per inference batch in the node [64 with CUDA, else config]
#   --dry-run              print the commands, run nothing
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python=python3 wheels="" venv="" install=1 dry=0
providers="cuda tensorrt cpu" batch_sizes="1 2 4 8 16 32 64" repeat=3
turnaround_slices=300 turnaround_repeat=3 turnaround_batch=""

while (($#)); do
    case "$1" in
        --python) python="$2"; shift 2 ;;
        --wheels) wheels="$2"; shift 2 ;;
        --venv) venv="$2"; shift 2 ;;
        --no-install) install=0; shift ;;
        --providers) providers="$2"; shift 2 ;;
        --batch-sizes) batch_sizes="$2"; shift 2 ;;
        --repeat) repeat="$2"; shift 2 ;;
        --turnaround-slices) turnaround_slices="$2"; shift 2 ;;
        --turnaround-repeat) turnaround_repeat="$2"; shift 2 ;;
        --turnaround-batch) turnaround_batch="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

run() {
    echo "+ $*" >&2
    if ((!dry)); then "$@"; fi
}

started=$SECONDS
cd "$here"

# --- 1. install --------------------------------------------------------------------------
if ((install)); then
    venv="${venv:-/tmp/dicomnode-gpu-$$/venv}"
    run "$python" -m venv --system-site-packages "$venv"
    python="$venv/bin/python"
    pip=("$python" -m pip install --disable-pip-version-check --quiet)
    if [[ -n "$wheels" ]]; then
        pip+=(--no-index --find-links "$wheels")
    fi
    # onnxruntime-gpu provides the same module as the CPU-only onnxruntime the machine may
    # have: in the venv it comes first on the path.
    run "${pip[@]}" onnxruntime-gpu
    if [[ -n "$wheels" ]] && compgen -G "$wheels/dicomnode-*.whl" >/dev/null; then
        run "${pip[@]}" dicomnode  # built here with: pip wheel --no-deps -w DIR .
    elif [[ -n "$wheels" ]]; then
        run "${pip[@]}" --no-build-isolation "$here"  # offline: setuptools from the machine
    else
        run "${pip[@]}" "$here"
    fi
fi

# CUDA and cuDNN from the nvidia-* pip packages: their lib folders on the loader's path
# (gpu.py also calls onnxruntime.preload_dlls() where it exists).
if ((!dry)); then
    nvidia_libs="$("$python" - <<'EOF' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})))
EOF
)"
    if [[ -n "$nvidia_libs" ]]; then
        export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi

# --- 2. + 3. the CUDA check and the sweep -------------------------------------------------
# shellcheck disable=SC2086  # word splitting of the lists is wanted
run "$python" benchmarks/gpu.py --providers $providers --batch-sizes $batch_sizes \
    --repeat "$repeat"

# --- 4. turnaround with inference on the GPU ----------------------------------------------
if ((turnaround_slices > 0)); then
    cuda=0
    if ((!dry)) && "$python" - <<'EOF' 2>/dev/null; then cuda=1; fi
import ctypes, sys
import onnxruntime as ort
try:
    ctypes.CDLL("libcuda.so.1")
except OSError:
    sys.exit(1)
sys.exit(0 if "CUDAExecutionProvider" in ort.get_available_providers() else 1)
EOF
    args=(--slices "$turnaround_slices" --repeat "$turnaround_repeat")
    if ((dry)); then
        echo "turnaround (dry run: CUDA not checked):"
        args+=(--providers cuda cpu --batch-size "${turnaround_batch:-64}")
    elif ((cuda)); then
        echo "turnaround with inference on the GPU (CUDA, batch ${turnaround_batch:-64}):"
        args+=(--providers cuda cpu --batch-size "${turnaround_batch:-64}")
    else
        echo "turnaround: NO CUDA here, inference on the CPU (these are CPU figures):"
        args+=(--providers cpu)
        [[ -n "$turnaround_batch" ]] && args+=(--batch-size "$turnaround_batch")
    fi
    run "$python" benchmarks/turnaround.py "${args[@]}"
fi
echo "gpu.sh done in $((SECONDS - started)) s"
