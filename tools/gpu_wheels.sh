#!/usr/bin/env bash
# Download exactly the wheels a bare GPU machine lacks for tools/gpu_checks.sh, for its
# Python 3.12 (cp312, manylinux x86_64): today webdataset and braceexpand (~80 kB, pure
# Python; shards only: folder training does not import them). Never numpy or torch wheels:
# they would shadow the machine's own builds.
#
#   tools/gpu_wheels.sh .whl
#
# Carry them with the device tool: ignore the folder in git (`echo /.whl/ >> .git/info/exclude`),
# name it in `carry`, and start the command with `WHEELS=.whl tools/gpu_checks.sh 1`
# (gpu_checks.sh installs them into a scratch --target folder and puts it on PYTHONPATH).
set -euo pipefail
DEST=${1:?usage: tools/gpu_wheels.sh DIR}
WHEELS=(webdataset==1.0.2 braceexpand==0.1.7)
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
