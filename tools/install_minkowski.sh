#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (the `minkowski` sparse_ops backend) from its
# PyPI sdist against the torch already installed in the current Python environment.
#
#   tools/install_minkowski.sh            # CPU-only build unless CUDA is usable
#   ME_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" tools/install_minkowski.sh   # e.g. docker build
#
# What the stock sdist needs, and what this script does about it:
# * libopenblas-dev (apt) for --blas=openblas: installed when missing and we are root.
# * setup.py imports numpy.distutils, which needs numpy<2 and setuptools<60: both go into a
#   private build folder put first on PYTHONPATH for the build only, so the project's own
#   numpy/setuptools are never downgraded. The wheel is built, then installed --no-deps.
# * Python >= 3.10: `from collections import Sequence` -> `collections.abc` in five modules.
# * CUDA >= 12 (thrust no longer pulled in transitively): add the thrust headers
#   <thrust/execution_policy.h>, <thrust/remove.h>, <thrust/unique.h> where they are used.
# Exits non-zero on any failure, and checks the import at the end.
set -euo pipefail

PYTHON=${PYTHON:-python}
ME_VERSION=0.5.4
WORK=${ME_BUILD_DIR:-$(mktemp -d -t minkowski-build.XXXXXX)}
JOBS=${MAX_JOBS:-$(nproc)}

log() { printf '[install_minkowski] %s\n' "$*" >&2; }

if "$PYTHON" -c "import MinkowskiEngine" 2>/dev/null; then
    log "MinkowskiEngine already importable: $("$PYTHON" -c 'import MinkowskiEngine as ME; print(ME.__version__)')"
    exit 0
fi

if ! ldconfig -p | grep -q libopenblas; then
    if [ "$(id -u)" = 0 ]; then
        log "installing libopenblas-dev"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libopenblas-dev
    else
        log "libopenblas-dev is missing: run 'sudo apt-get install libopenblas-dev' and retry"; exit 1
    fi
fi

log "build folder: $WORK"
"$PYTHON" -m pip install -q --target "$WORK/buildtools" "setuptools<60" "numpy<2" wheel
# pip download runs setup.py egg_info, which needs the old build tools on the path as well
PYTHONPATH="$WORK/buildtools" "$PYTHON" -m pip download -q --no-deps --no-binary :all: \
    --no-build-isolation -d "$WORK" "MinkowskiEngine==$ME_VERSION"
tar -xzf "$WORK/MinkowskiEngine-$ME_VERSION.tar.gz" -C "$WORK"
SRC="$WORK/MinkowskiEngine-$ME_VERSION"

log "patching collections.Sequence imports for Python >= 3.10"
grep -rl "from collections import" "$SRC/MinkowskiEngine" | while read -r file; do
    sed -i -E 's/^from collections import (Sequence|namedtuple, Sequence|Sequence, namedtuple)$/from collections import namedtuple\nfrom collections.abc import Sequence/' "$file"
done
grep -rn "from collections import" "$SRC/MinkowskiEngine" | grep -q "Sequence" && {
    log "a 'from collections import Sequence' is left unpatched"; exit 1; }

CUDA_FLAG="--cpu_only"
if [ "${ME_FORCE_CUDA:-0}" = 1 ] || "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CUDA_FLAG="--force_cuda"
    log "CUDA build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}); adding thrust includes"
    sed -i '1i #include <thrust/execution_policy.h>' "$SRC/src/3rdparty/concurrent_unordered_map.cuh"
    sed -i '1i #include <thrust/remove.h>\n#include <thrust/unique.h>' "$SRC/src/coordinate_map_gpu.cu"
fi

log "building ($CUDA_FLAG, $JOBS jobs); this takes a few minutes"
(cd "$SRC" && MAX_JOBS=$JOBS PYTHONPATH="$WORK/buildtools" "$PYTHON" setup.py -q bdist_wheel \
    -d "$WORK/wheel" --blas=openblas $CUDA_FLAG)
"$PYTHON" -m pip install -q --no-deps "$WORK"/wheel/MinkowskiEngine-*.whl
"$PYTHON" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__, 'CUDA' if ME.is_cuda_available() else 'CPU')"
