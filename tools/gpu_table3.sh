#!/usr/bin/env bash
# The GPU half of the runtime table (the paper's Table 3) in one go, on a machine with one
# NVIDIA GPU: the full-size slide, full-size untrained models converted to ONNX, then
# export/benchmark.py with ONNX Runtime's CUDA and TensorRT execution providers for H2G-Net
# (MobileNetV2 + U-Net) and DMMN-M3 (three 256 px views), plus OpenVINO on GPU where
# OpenVINO sees one (an Intel GPU).  Markdown and JSON go to --out (default bench/gpu);
# gpu_table3.md there collects them with the machine, the versions and each step's time.
#
#   tools/gpu_table3.sh                # on the GPU machine: venv, install, slide, models, timings
#   tools/gpu_table3.sh --dry-run      # anywhere: print every command; check scripts and flags exist
#   tools/gpu_table3.sh --cpu-check    # anywhere: the same pipeline end to end on a tiny slide and
#                                      # tiny models with the CPU provider (the current python)
#
# Options: --out DIR (bench/gpu) --work DIR (bench/gpu_work: slide, models, venv)
#          --repeats N (3, H2G-Net) --dmmn-repeats N (1) --readers N (all cores)
#          --python PY (the interpreter for --dry-run / --cpu-check, default python)
#          --skip-install (GPU mode: reuse the venv in --work as it is)
#          --only h2g|dmmn (time one system; a second call with --skip-install times the other,
#          reusing the slide, the models and TensorRT's engines kept in --work)
#
# GPU mode needs only python3 (3.10+) and pip reaching the package registries: it makes a
# venv in --work and installs h2g with the [train] extra (TensorFlow, to build and convert
# the models) and the [gpu] extra (onnxruntime-gpu for CUDA 13 with its CUDA / cuDNN wheels,
# TensorRT 10's libraries), replacing the CPU onnxruntime wheel.  TensorFlow converts on
# the CPU (CUDA_VISIBLE_DEVICES is emptied for it).  The full slide (101216 x 100864 px,
# 1.8 GB) is rendered on every core while the GPU wheels install.  Budget, estimated for
# 16 cores and an H100 (not measured: no GPU machine has run it yet): install 2-3 min
# (the slide meanwhile), models + conversion 1-2 min, H2G-Net (3234 patches) 2 x ~1 min
# (TensorRT builds its engines once, cached in --work), DMMN-M3 (17137 windows of three
# views, read-bound) 2 x ~1.5-2 min: 8-10 min in all, so where one call must stay under 8
# minutes run `--only h2g`, then `--skip-install --only dmmn` on the same machine.  Each
# step's time is printed and written to gpu_table3.md.  Exit codes: 0 all timed, 1 a timing
# failed (the others still run; gpu_table3.md says which), 2 bad arguments, 3 no GPU.
set -euo pipefail

ROOT="${H2G_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"  # H2G_ROOT: the checkout (tests)
cd "$ROOT"

MODE=gpu
OUT=bench/gpu
WORK=bench/gpu_work
REPEATS=3
DMMN_REPEATS=1
READERS=""
PY_ARG=""
SKIP_INSTALL=0
ONLY=all

die() { echo "gpu_table3.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) MODE=dry; shift ;;
        --cpu-check) MODE=cpu; shift ;;
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --work) need_value "$@"; WORK="$2"; shift 2 ;;
        --repeats) need_value "$@"; positive "$1" "$2"; REPEATS="$2"; shift 2 ;;
        --dmmn-repeats) need_value "$@"; positive "$1" "$2"; DMMN_REPEATS="$2"; shift 2 ;;
        --readers) need_value "$@"; positive "$1" "$2"; READERS="$2"; shift 2 ;;
        --python) need_value "$@"; PY_ARG="$2"; shift 2 ;;
        --skip-install) SKIP_INSTALL=1; shift ;;
        --only) need_value "$@"; [[ "$2" == h2g || "$2" == dmmn ]] || die "--only must be h2g or dmmn, got '$2'"
                ONLY="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -z "$PY_ARG" || "$MODE" != gpu ]] || die "--python applies to --dry-run and --cpu-check (GPU mode uses its venv)"

CORES="$(nproc 2>/dev/null || echo 2)"
READERS="${READERS:-$CORES}"
VENV="$WORK/venv"
# PY runs the commands (GPU mode and --dry-run print the venv's); CHECK_PY answers --help in a dry run
case "$MODE" in
    gpu) PY="$VENV/bin/python" ;;
    dry) PY="$VENV/bin/python"; CHECK_PY="${PY_ARG:-python}" ;;
    cpu) PY="${PY_ARG:-python}" ;;
esac
STEPS_MD="$OUT/.steps.md"
FAILED=()
START=$SECONDS

# --------------------------------------------------------------------------- running
# run CMD...: print it; in --dry-run also check it (python scripts: the file exists, --help
# works, every --flag given is in its help); otherwise run it.
declare -A HELP=()  # each script's --help, asked once
check_python_command() {
    local script="$1"; shift
    [[ -f "$script" ]] || die "dry run: $script does not exist"
    if [[ -z "${HELP[$script]:-}" ]]; then
        HELP[$script]="$("$CHECK_PY" "$script" --help 2>&1)" || die "dry run: $CHECK_PY $script --help failed: ${HELP[$script]}"
    fi
    local help="${HELP[$script]}"
    local arg
    for arg in "$@"; do
        if [[ "$arg" == --* ]]; then
            grep -q -- "${arg%%=*}" <<<"$help" || die "dry run: $script has no option ${arg%%=*}"
        fi
    done
}

run() {
    echo "+ $*"
    if [[ "$MODE" == dry ]]; then
        local args=("$@") i
        for ((i = 0; i + 1 < ${#args[@]}; i++)); do  # "[env VAR=...] PY script.py ..."
            if [[ "${args[i]}" == "$PY" && "${args[i + 1]}" == *.py ]]; then
                check_python_command "${args[@]:i+1}"
                break
            fi
        done
        return 0
    fi
    "$@"
}

# step NAME CMD...: run and time a step; a failed timing step is recorded, not fatal.
step() {
    local name="$1"; shift
    local t0=$SECONDS status=0
    echo "== $name"
    run "$@" || status=$?
    local took=$((SECONDS - t0))
    if [[ "$MODE" != dry ]]; then
        if [[ $status -eq 0 ]]; then
            echo "| $name | ${took} s | ok |" >>"$STEPS_MD"
        else
            echo "| $name | ${took} s | **failed (exit $status)** |" >>"$STEPS_MD"
            FAILED+=("$name")
        fi
    fi
    return 0
}

# required NAME CMD...: a step whose failure stops the script (install, slide, models).
required() {
    local name="$1"; shift
    local t0=$SECONDS
    echo "== $name"
    run "$@" || { echo "gpu_table3.sh: step '$name' failed; stopping" >&2; exit 1; }
    [[ "$MODE" == dry ]] || echo "| $name | $((SECONDS - t0)) s | ok |" >>"$STEPS_MD"
}

# --------------------------------------------------------------------------- the GPU
if [[ "$MODE" == dry ]]; then
    echo "+ nvidia-smi -L   # no GPU listed: exit 3"
elif [[ "$MODE" == gpu ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
        echo "gpu_table3.sh: no NVIDIA GPU visible (nvidia-smi is missing or lists no GPU): the GPU half" \
             "of Table 3 needs one. Check the pipeline on this machine with --cpu-check instead." >&2
        exit 3
    fi
fi

if [[ "$MODE" != dry ]]; then
    mkdir -p "$OUT" "$WORK"
    printf '| Step | Time | Status |\n|---|---|---|\n' >"$STEPS_MD"
fi

# --------------------------------------------------------------------------- install
INSTALL=0
[[ "$MODE" == dry || ( "$MODE" == gpu && "$SKIP_INSTALL" -eq 0 ) ]] && INSTALL=1
if [[ $INSTALL -eq 1 ]]; then
    required "venv" python3 -m venv "$VENV"
    # the training stack first (TensorFlow builds and converts the models); the GPU wheels later,
    # while the slide renders: they leave numpy and the rest of what make_cohort imports alone
    required "install h2g[train]" "$VENV/bin/pip" install --quiet -e ".[train]"
fi

# --------------------------------------------------------------------------- slides
if [[ "$MODE" == cpu ]]; then
    SLIDE_DIR="$WORK/tiny"
    required "tiny cohort" "$PY" tools/make_cohort.py --preset tiny --out "$SLIDE_DIR" --quiet
    SLIDE="$SLIDE_DIR/cohort/slides/t06.tiff"
    PARITY_SLIDE="$SLIDE_DIR/cohort/slides/t01.tiff"
    MODEL_ARGS=(--tiny)
else
    PARITY_SLIDE="$WORK/tiny/cohort/slides/t01.tiff"
    if [[ "$MODE" == gpu && -f "$PARITY_SLIDE" ]]; then
        echo "== tiny cohort: $PARITY_SLIDE exists, kept"
    else
        required "tiny cohort (conversion parity slide)" "$PY" tools/make_cohort.py --preset tiny --out "$WORK/tiny" --quiet
    fi
    SLIDE="$WORK/full/cohort/slides/f01.tiff"
    MODEL_ARGS=()
fi

SLIDE_PID=""
if [[ "$MODE" != cpu ]]; then  # the full slide renders on every core while the rest installs
    echo "== full slide (background: $WORK/full_slide.log)"
    if [[ "$MODE" == dry ]]; then
        run "$PY" tools/make_cohort.py --preset full --out "$WORK/full" --quiet
    elif [[ -f "$SLIDE" ]]; then
        echo "   $SLIDE exists: kept"
    else
        T_SLIDE=$SECONDS
        echo "+ $PY tools/make_cohort.py --preset full --out $WORK/full --quiet &"
        "$PY" tools/make_cohort.py --preset full --out "$WORK/full" --quiet >"$WORK/full_slide.log" 2>&1 &
        SLIDE_PID=$!
    fi
fi

if [[ $INSTALL -eq 1 ]]; then
    required "install h2g[gpu]" "$VENV/bin/pip" install --quiet -e ".[gpu]"
    # onnxruntime (base) and onnxruntime-gpu ship the same module: keep the GPU build alone
    required "uninstall CPU onnxruntime" "$VENV/bin/pip" uninstall --yes onnxruntime onnxruntime-gpu
    required "reinstall onnxruntime-gpu" "$VENV/bin/pip" install --quiet --force-reinstall --no-deps \
        "onnxruntime-gpu>=1.31,<1.32"
fi
if [[ "$MODE" == dry ]]; then
    echo "+ export LD_LIBRARY_PATH=<venv>/nvidia/*/lib:<tensorrt_libs>  H2G_TRT_CACHE=$WORK/tensorrt_cache"
elif [[ "$MODE" == gpu ]]; then
    # CUDA, cuDNN and TensorRT libraries from the nvidia-* and tensorrt wheels
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    LIBS="$(find "$SITE/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | paste -sd: -)"  # nvidia/<pkg>[/cu13]/lib
    TRT_LIBS="$("$PY" -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))' 2>/dev/null || true)"
    export LD_LIBRARY_PATH="${LIBS}${TRT_LIBS:+:$TRT_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export H2G_TRT_CACHE="$ROOT/$WORK/tensorrt_cache"
    "$PY" -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'
fi

# --------------------------------------------------------------------------- models
MODELS="$WORK/models"
# TensorFlow builds and converts on the CPU; the GPU is left to the timings
if [[ "$MODE" == gpu && -f "$MODELS/mobilenetv2.onnx" && -f "$MODELS/unet.onnx" && -f "$MODELS/dmmn_m3.onnx" ]]; then
    echo "== models: $MODELS has them converted, kept"
else
    required "models (untrained${MODEL_ARGS:+, tiny})" env CUDA_VISIBLE_DEVICES= TF_CPP_MIN_LOG_LEVEL=2 \
        "$PY" tools/model_summary.py mobilenetv2 unet dmmn_m3 "${MODEL_ARGS[@]}" --save "$MODELS"
    required "convert to ONNX + OpenVINO (parity on $PARITY_SLIDE)" env CUDA_VISIBLE_DEVICES= TF_CPP_MIN_LOG_LEVEL=2 \
        "$PY" export/convert.py "$MODELS" --slide "$PARITY_SLIDE" --quiet
fi

if [[ -n "$SLIDE_PID" ]]; then
    echo "== waiting for the full slide"
    if wait "$SLIDE_PID"; then
        echo "| full slide (in the background) | $((SECONDS - T_SLIDE)) s | ok |" >>"$STEPS_MD"
    else
        echo "gpu_table3.sh: the full slide failed (see $WORK/full_slide.log)" >&2
        exit 1
    fi
fi

# --------------------------------------------------------------------------- timings
if [[ "$MODE" == cpu ]]; then
    PROVIDERS=(cpu)
else
    PROVIDERS=(cuda tensorrt)
fi
for provider in "${PROVIDERS[@]}"; do
    if [[ "$provider" == cpu ]]; then DEVICE=(--device CPU); else DEVICE=(--device GPU --provider "$provider"); fi
    [[ "$ONLY" == dmmn ]] || step "H2G-Net, ONNX Runtime $provider" "$PY" export/benchmark.py --slide "$SLIDE" \
        --patch-model "$MODELS/mobilenetv2.onnx" --refine-model "$MODELS/unet.onnx" --engine onnxruntime \
        "${DEVICE[@]}" --readers "$READERS" --repeats "$REPEATS" \
        --json "$OUT/h2g_onnxruntime_$provider.json" --markdown "$OUT/h2g_onnxruntime_$provider.md"
    [[ "$ONLY" == h2g ]] || step "DMMN-M3, ONNX Runtime $provider" "$PY" export/benchmark.py --slide "$SLIDE" \
        --model "$MODELS/dmmn_m3.onnx" --engine onnxruntime "${DEVICE[@]}" --batch-size 16 \
        --readers "$READERS" --repeats "$DMMN_REPEATS" \
        --json "$OUT/dmmn_m3_onnxruntime_$provider.json" --markdown "$OUT/dmmn_m3_onnxruntime_$provider.md"
done

OPENVINO_GPU=no
if [[ "$MODE" == gpu ]]; then  # OpenVINO's GPU plugin drives Intel GPUs; probed without TensorFlow loaded
    if "$PY" -c 'import openvino as ov, sys; sys.exit(0 if "GPU" in ov.Core().available_devices else 1)' 2>/dev/null; then
        OPENVINO_GPU=yes
    fi
elif [[ "$MODE" == dry ]]; then
    OPENVINO_GPU=yes  # print and check the command
fi
if [[ "$OPENVINO_GPU" == yes && "$ONLY" != dmmn ]]; then
    step "H2G-Net, OpenVINO GPU" "$PY" export/benchmark.py --slide "$SLIDE" \
        --patch-model "$MODELS/mobilenetv2.xml" --refine-model "$MODELS/unet.xml" --engine openvino \
        --device GPU --readers "$READERS" --repeats "$REPEATS" \
        --json "$OUT/h2g_openvino_gpu.json" --markdown "$OUT/h2g_openvino_gpu.md"
fi

# --------------------------------------------------------------------------- the report
if [[ "$MODE" == dry ]]; then
    echo "dry run: every command above exists with the flags it is given"
    exit 0
fi
{
    echo "# The GPU half of Table 3 (tools/gpu_table3.sh$([[ $MODE == cpu ]] && echo " --cpu-check"))"
    echo
    if [[ "$MODE" == gpu ]]; then
        echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
    else
        echo "- CPU check: tiny slide and tiny models, ONNX Runtime's CPU provider (the numbers mean nothing)"
    fi
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($CORES cores), $READERS readers"
    echo "- $("$PY" -c 'import onnxruntime as o, openvino as v; print("onnxruntime", o.__version__, o.get_available_providers(), "/ openvino", v.get_version())')"
    echo "- slide: $SLIDE; models: $MODELS (untrained); H2G-Net repeats $REPEATS, DMMN-M3 repeats $DMMN_REPEATS"
    echo "- OpenVINO GPU: $([[ $OPENVINO_GPU == yes ]] && echo timed || echo "not timed (OpenVINO sees no GPU: its GPU plugin drives Intel GPUs)")"
    echo "- total: $((SECONDS - START)) s"
    echo
    cat "$STEPS_MD"
    for md in "$OUT"/h2g_*.md "$OUT"/dmmn_*.md; do
        [[ -f "$md" ]] || continue
        echo
        echo "## $(basename "$md" .md)"
        echo
        sed '1{/^# /d}' "$md"
    done
} >"$OUT/gpu_table3.md"
rm -f "$STEPS_MD"
echo "wrote $OUT/gpu_table3.md ($((SECONDS - START)) s)"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "gpu_table3.sh: failed: ${FAILED[*]}" >&2
    exit 1
fi
