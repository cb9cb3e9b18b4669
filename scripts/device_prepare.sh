#!/usr/bin/env bash
# Run here, before scripts/gpu_check.sh goes to a lent GPU machine (the `device` tool's `run`).
# That machine reaches no network and its Python image lacks PyAV and argparse-dataclass, and
# only the checkout travels, not ../shared: this puts the wheels in .whl/ and the test video in
# .devmedia/, both ignored by git (.gitignore: never committed), to be named in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .devmedia
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
av_version=$("$python" -c 'import av; print(av.__version__)')
# The machine's python3 is 3.12 on x86-64 (see the device tool's KINDS.md).
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "av==$av_version" argparse-dataclass
cp ../shared/media/highway_2cars_720p.mp4 .devmedia/
du -sh .whl .devmedia
echo "now: run(command='bash scripts/gpu_check.sh', carry=['.whl', '.devmedia'], timeout_s=540)"
