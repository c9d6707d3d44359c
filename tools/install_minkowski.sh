#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (the `minkowski` sparse_ops backend) from its PyPI
# sdist against the torch already installed in the current Python environment.
#
#   tools/install_minkowski.sh            # CPU-only build unless CUDA is usable
#   ME_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" tools/install_minkowski.sh   # CUDA without a GPU (docker build)
#
# Built here: Python 3.11 and 3.12 for CPU, and with CUDA 13.0 for sm_90 (nvcc of CUDA_HOME, as torch
# finds it; tools/check_minkowski_cuda.sh). The CUDA 12 code paths are kept, not compiled here.
# Settings (environment): PYTHON (default python), MAX_JOBS (default nproc), ME_BUILD_DIR (build
# folder, default a fresh temporary one), ME_SDIST (a local MinkowskiEngine-0.5.4.tar.gz instead
# of the download), ME_WHEEL_DIR (also keep the built wheel there), ME_FORCE_CUDA=1,
# ME_NO_INSTALL=1 (build the wheel only; with ME_WHEEL_DIR, for another machine),
# ME_SOURCE_ONLY=1 (stop after patching: the source is $ME_BUILD_DIR/MinkowskiEngine-0.5.4),
# ME_SKIP_PATCH=NAME (leave that patch out, to see what it fixes).
#
# What the stock sdist needs, and what this script does about it:
# * libopenblas-dev (apt) for --blas=openblas: installed when missing and we are root. Naming the
#   BLAS keeps setup.py away from numpy.distutils (gone in NumPy 2 and on Python 3.12).
# * The sdist is downloaded from its fixed PyPI file address and checked against its sha256
#   (pip would run its setup.py to read metadata, which needs numpy.distutils).
# * Build tools (setuptools >= 70.1 with bdist_wheel, ninja for parallel compiles) go into the
#   build folder, first on PYTHONPATH for the build only: the environment's own packages are
#   never changed. The wheel is built, then installed --no-deps.
# * tools/minkowski_patches/*.patch, applied in order (each file says why): Python >= 3.10,
#   a setup.py that uninstalls nothing and finds CCCL's headers for g++, and the CUDA 12/13
#   (CCCL 2/3, torch 2.11 headers) ports. All apply to every build; CPU builds compile no .cu.
# Exits non-zero on any failure, and checks the import at the end.
set -euo pipefail

PYTHON=${PYTHON:-python}
ME_VERSION=0.5.4
ME_SDIST_URL=https://files.pythonhosted.org/packages/21/5c/c543c4bc5fbe73ac3e38465b3da4f24a61f7a4ac5baec867e582e94aa551/MinkowskiEngine-0.5.4.tar.gz
ME_SDIST_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
PATCHES=$(cd "$(dirname "$0")" && pwd)/minkowski_patches
WORK=${ME_BUILD_DIR:-$(mktemp -d -t minkowski-build.XXXXXX)}
JOBS=${MAX_JOBS:-$(nproc)}

log() { printf '[install_minkowski] %s\n' "$*" >&2; }

if [ "${ME_NO_INSTALL:-0}" != 1 ] && [ "${ME_SOURCE_ONLY:-0}" != 1 ] && "$PYTHON" -c "import MinkowskiEngine" 2>/dev/null; then
    log "MinkowskiEngine already importable: $("$PYTHON" -c 'import MinkowskiEngine as ME; print(ME.__version__)')"
    exit 0
fi

if [ "${ME_SOURCE_ONLY:-0}" != 1 ] && ! ldconfig -p | grep -q libopenblas; then
    if [ "$(id -u)" = 0 ]; then
        log "installing libopenblas-dev"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libopenblas-dev
    else
        log "libopenblas-dev is missing: run 'sudo apt-get install libopenblas-dev' and retry"; exit 1
    fi
fi

log "build folder: $WORK"
mkdir -p "$WORK"

SDIST="$WORK/MinkowskiEngine-$ME_VERSION.tar.gz"
"$PYTHON" - "${ME_SDIST:-$ME_SDIST_URL}" "$SDIST" "$ME_SDIST_SHA256" <<'EOF'
import hashlib, shutil, sys, urllib.request
source, target, sha256 = sys.argv[1:]
with (open(source, "rb") if "://" not in source else urllib.request.urlopen(source, timeout=300)) as file:
    data = file.read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"{source}: sha256 {hashlib.sha256(data).hexdigest()} is not MinkowskiEngine 0.5.4's {sha256}")
open(target, "wb").write(data)
EOF
rm -rf "$WORK/MinkowskiEngine-$ME_VERSION"
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/MinkowskiEngine-$ME_VERSION"

for patch_file in "$PATCHES"/*.patch; do
    if [ "$(basename "$patch_file" .patch)" = "${ME_SKIP_PATCH:-}" ]; then
        log "leaving out $(basename "$patch_file") (ME_SKIP_PATCH)"; continue
    fi
    log "applying $(basename "$patch_file")"
    patch -d "$SRC" -p1 --batch --forward --quiet < "$patch_file"
done
[ "${ME_SOURCE_ONLY:-0}" = 1 ] && { log "patched source: $SRC"; exit 0; }

"$PYTHON" -m pip install -q --target "$WORK/buildtools" "setuptools>=70.1,<82" wheel ninja   # torch 2.11 declares setuptools<82
export PATH="$WORK/buildtools/bin:$PATH"

CUDA_FLAG="--cpu_only"
if [ "${ME_FORCE_CUDA:-0}" = 1 ] || "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CUDA_FLAG="--force_cuda"
    log "CUDA build (CUDA_HOME=${CUDA_HOME:-as torch finds it}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
fi

log "building ($CUDA_FLAG, $JOBS jobs); this takes a few minutes"
(cd "$SRC" && MAX_JOBS=$JOBS PYTHONPATH="$WORK/buildtools" "$PYTHON" setup.py -q bdist_wheel \
    -d "$WORK/wheel" --blas=openblas $CUDA_FLAG)
WHEEL=$(ls "$WORK"/wheel/[Mm]inkowski[Ee]ngine-*.whl)
if [ -n "${ME_WHEEL_DIR:-}" ]; then
    mkdir -p "$ME_WHEEL_DIR" && cp "$WHEEL" "$ME_WHEEL_DIR/"
    log "wheel kept: $ME_WHEEL_DIR/$(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
fi
[ "${ME_NO_INSTALL:-0}" = 1 ] && exit 0
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL"
"$PYTHON" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__, 'CUDA' if ME.is_cuda_available() else 'CPU')"
