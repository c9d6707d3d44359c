#!/usr/bin/env bash
# MinkowskiEngine's CUDA build, proven on a machine without a GPU.
#
#   tools/check_minkowski_cuda.sh                  # the whole extension for sm_90, then its CPU tests
#   tools/check_minkowski_cuda.sh --compile-only   # only the translation units the CUDA ports touch (CI)
#
# PYTHON (default python) must have a CUDA 13 build of torch (e.g. torch 2.11+cu130; no GPU
# needed). The CUDA 13 compiler, runtime, CCCL and library headers come from NVIDIA's PyPI wheels,
# versions matched to torch's, into a scratch folder; a CUDA_HOME is assembled there from them.
# The ME source is tools/install_minkowski.sh's, patched (ME_SKIP_PATCH=NAME leaves one patch
# out: the compile-only check then fails, which is how each patch is shown to be needed).
#
# Whole build: tools/install_minkowski.sh with ME_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0; the
# wheel goes to ME_WHEEL_DIR (default $WORK/wheel) and into a scratch --target folder, never into
# the environment; then tests/test_minkowski.py runs on CPU with that build (a CUDA build keeps
# every CPU kernel), FCMAE_REQUIRE_MINKOWSKI=1 so nothing is skipped. About 40 minutes on 2 cores.
# Compile-only: nvcc -c of coordinate_map_gpu.cu (the hash map, functors and shared_ptr ports:
# patches 03-07) and spmm.cu (03), g++ -fsyntax-only of quantization.cpp (02), with the flags
# torch's extension builder uses; a few minutes.
set -euo pipefail

PYTHON=${PYTHON:-python}
MODE=${1:-full}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${ME_CHECK_DIR:-$(mktemp -d -t minkowski-cuda.XXXXXX)}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
log() { printf '[check_minkowski_cuda] %s\n' "$*" >&2; }
START=$SECONDS

CUDA=$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")
case "$CUDA" in
    13.*) ;;
    *) log "torch's CUDA is '${CUDA:-none}': this check needs a CUDA 13 build of torch (e.g. torch 2.11+cu130)"; exit 1 ;;
esac
log "torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), CUDA $CUDA, sm ${ARCH}; scratch folder $WORK"

# 1. The CUDA toolkit from PyPI: compiler wheels of torch's CUDA minor version, library
#    headers of exactly the versions torch runs with.
LIBS=$("$PYTHON" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
pins = []
for name in ("nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cusparse", "nvidia-curand", "nvidia-cusolver", "nvidia-nvtx"):
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
print(" ".join(pins))
EOF
)
# shellcheck disable=SC2086  # LIBS is a list of requirements
"$PYTHON" -m pip install -q --no-deps --target "$WORK/cuda-wheels" \
    "nvidia-cuda-nvcc==$CUDA.*" "nvidia-cuda-crt==$CUDA.*" "nvidia-nvvm==$CUDA.*" "nvidia-cuda-cccl==$CUDA.*" $LIBS
TOOLKIT="$WORK/cuda-wheels/nvidia/cu13"
export CUDA_HOME="$WORK/cuda"
mkdir -p "$CUDA_HOME/lib64"
ln -sfn "$TOOLKIT/bin" "$CUDA_HOME/bin"
ln -sfn "$TOOLKIT/include" "$CUDA_HOME/include"
ln -sfn "$TOOLKIT/nvvm" "$CUDA_HOME/nvvm"
for lib in "$TOOLKIT"/lib/*; do ln -sfn "$lib" "$CUDA_HOME/lib64/"; done
for name in cudart cusparse cublas cublasLt; do   # the linker wants unversioned names
    versioned=$(cd "$CUDA_HOME/lib64" && ls "lib$name.so."* | head -1)
    ln -sfn "$versioned" "$CUDA_HOME/lib64/lib$name.so"
done
log "$("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"

# 2. The patched source.
ME_SOURCE_ONLY=1 ME_BUILD_DIR="$WORK/me" PYTHON="$PYTHON" "$ROOT/tools/install_minkowski.sh"
SRC="$WORK/me/MinkowskiEngine-0.5.4"

if [ "$MODE" = --compile-only ]; then
    # torch's extension flags: its include folders, and the C++ standard its headers require
    # (C++17 up to torch 2.13, C++20 from 2.14: ATen.h says which)
    mapfile -t FLAGS < <("$PYTHON" - "$SRC" "$CUDA_HOME" <<'EOF'
import sys, sysconfig
from pathlib import Path
from torch.utils.cpp_extension import include_paths
src, cuda_home = sys.argv[1:]
aten = next(Path(path, "ATen", "ATen.h") for path in include_paths("cuda") if Path(path, "ATen", "ATen.h").is_file())
print("-std=c++20" if "C++20 or later" in aten.read_text() else "-std=c++17")
for path in [*include_paths("cuda"), f"{cuda_home}/include", f"{src}/src", f"{src}/src/3rdparty",
             f"{cuda_home}/include/cccl", sysconfig.get_paths()["include"]]:
    print(f"-I{path}")
EOF
)
    STD=${FLAGS[0]}
    INCLUDES=("${FLAGS[@]:1}")
    DEFINES=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D__CUDA_NO_HALF_OPERATORS__
             -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
    SM=${ARCH//./}
    pids=()
    for unit in coordinate_map_gpu.cu spmm.cu; do   # side by side: each nvcc uses one core
        log "nvcc -c src/$unit (sm_$SM, $STD)"
        "$CUDA_HOME/bin/nvcc" -c "$SRC/src/$unit" -o "$WORK/${unit%.cu}.o" "${INCLUDES[@]}" "${DEFINES[@]}" \
            --expt-relaxed-constexpr --expt-extended-lambda "$STD" -O3 --compiler-options -fPIC \
            -gencode "arch=compute_$SM,code=sm_$SM" > "$WORK/${unit%.cu}.log" 2>&1 &
        pids+=($!)
    done
    log "g++ -fsyntax-only src/quantization.cpp (the CUDA build's host compile)"
    failed=0
    g++ -fsyntax-only "$STD" -fopenmp "${INCLUDES[@]}" "${DEFINES[@]}" "$SRC/src/quantization.cpp" || failed=1
    for index in 0 1; do
        unit=$([ "$index" = 0 ] && echo coordinate_map_gpu || echo spmm)
        if ! wait "${pids[$index]}"; then
            grep -E "error|Error" "$WORK/$unit.log" | head -20 >&2
            log "nvcc -c src/$unit.cu failed (whole log: $WORK/$unit.log)"; failed=1
        fi
    done
    [ "$failed" = 0 ] || { log "compile-only check FAILED after $((SECONDS - START)) s"; exit 1; }
    log "compile-only check passed in $((SECONDS - START)) s"
    exit 0
fi

# 3. The whole extension, installed into a scratch folder, and the backend tests on it.
WHEELS=${ME_WHEEL_DIR:-$WORK/wheel}
ME_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" ME_NO_INSTALL=1 ME_WHEEL_DIR="$WHEELS" ME_BUILD_DIR="$WORK/me" \
    PYTHON="$PYTHON" "$ROOT/tools/install_minkowski.sh"
"$PYTHON" -m pip install -q --no-deps --target "$WORK/site" "$WHEELS"/[Mm]inkowski[Ee]ngine-*.whl
log "built in $((SECONDS - START)) s: $(ls "$WHEELS"/[Mm]inkowski[Ee]ngine-*.whl) ($(du -h "$WHEELS"/[Mm]inkowski[Ee]ngine-*.whl | cut -f1))"
cd "$ROOT"
PYTHONPATH="$WORK/site:$ROOT" "$PYTHON" -c \
    "import MinkowskiEngine as ME, MinkowskiEngineBackend._C as C; print('MinkowskiEngine', ME.__version__, 'built with CUDA:', ME.is_cuda_available(), C.__file__)"
PYTHONPATH="$WORK/site:$ROOT" FCMAE_REQUIRE_MINKOWSKI=1 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_minkowski.py
log "whole check passed in $((SECONDS - START)) s"
