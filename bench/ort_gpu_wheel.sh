#!/usr/bin/env bash
# onnxruntime-gpu for a GPU machine that has no package registry and takes at most 64 MiB of files per call.
#
# On a machine with the registry (the wheel is about 244 MiB; its xz parts are under 60 MiB each):
#   bench/ort_gpu_wheel.sh pack              # -> .ortgpu/onnxruntime_gpu-*.whl.xz.part-aa, -ab, ...
#   ORT_VERSION=1.31.1 WHEEL=path.whl bench/ort_gpu_wheel.sh pack   # a given version, or a wheel already here
#
# Then carry one part per call to the GPU machine, back to back while it stays warm (the folder is
# ignored by git, and files carried by earlier calls stay there between calls):
#   call 1: carry [".ortgpu/<wheel>.xz.part-aa"]   command: ls .ortgpu
#   call 2: carry [".ortgpu/<wheel>.xz.part-ab"]   ...
#   last:   carry [".ortgpu/<wheel>.xz.part-ad"]   command: bench/ort_gpu_wheel.sh unpack && \
#             ORT_SITE=$PWD/.ortgpu/site bench/gpu_session.sh serving
#
#   bench/ort_gpu_wheel.sh unpack            # joins the parts, checks the sha256, extracts into .ortgpu/site
#   bench/ort_gpu_wheel.sh check             # python3 with ORT_SITE first: the providers onnxruntime offers
set -euo pipefail
DIR=${DIR:-.ortgpu}
PART=${PART:-55M}
ORT_VERSION=${ORT_VERSION:-$(python3 -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || echo 1.31.1)}
mkdir -p "$DIR"
case ${1:-} in
  pack)
    wheel=${WHEEL:-}
    if [ -z "$wheel" ]; then
      python3 -m pip download --no-deps --only-binary=:all: -d "$DIR/download" "onnxruntime-gpu==$ORT_VERSION"
      wheel=$(ls "$DIR"/download/onnxruntime_gpu-*.whl | head -1)
    fi
    name=$(basename "$wheel")
    rm -f "$DIR/$name".xz.part-*
    xz -T0 -6 -c "$wheel" | split -b "$PART" - "$DIR/$name.xz.part-"
    (cd "$(dirname "$wheel")" && sha256sum "$name") > "$DIR/$name.sha256"
    ls -l "$DIR/$name".xz.part-* "$DIR/$name.sha256"
    echo "carry $DIR/$name.sha256 with the first part"
    ;;
  unpack)
    first=$(ls "$DIR"/*.whl.xz.part-aa | head -1)
    name=$(basename "${first%.xz.part-aa}")
    cat "$DIR/$name".xz.part-* | xz -d > "$DIR/$name"
    if [ -f "$DIR/$name.sha256" ]; then (cd "$DIR" && sha256sum -c "$name.sha256"); fi
    rm -rf "$DIR/site" && mkdir -p "$DIR/site"
    python3 -m zipfile -e "$DIR/$name" "$DIR/site"
    echo "ORT_SITE=$PWD/$DIR/site"
    ;;
  check)
    PYTHONPATH="${ORT_SITE:-$PWD/$DIR/site}${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
      'import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())'
    ;;
  *)
    echo "usage: bench/ort_gpu_wheel.sh pack|unpack|check (see the top of the file)" >&2
    exit 2
    ;;
esac
