#!/usr/bin/env bash
# Prepare .whl/: the Python wheels `python -m benchmarks.gpu` needs on a GPU machine that has torch but not the rest
# of loopstack's stack, and cannot download anything itself (README, "GPU benchmark").
#
# The target image (Python 3.12, x86_64): torch 2.11 with CUDA, numpy, packaging, pyarrow, sentencepiece, pyyaml,
# safetensors, tokenizers, transformers, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm are there. Missing, so
# carried here: deepspeed (built from its sdist as a pure-python wheel, DS_BUILD_OPS=0: no CUDA op is compiled; the
# trainer uses none), megatron-core (a cp312 manylinux wheel), and deepspeed's needs the image lacks: hjson and pydantic
# (with pydantic-core, annotated-types, typing-inspection); typing-extensions and packaging travel too because
# pydantic and megatron-core need newer ones than an image may hold. Versions are the ones installed in this
# environment (the tests ran against them). benchmarks/gpu.py installs these into /tmp/site when deepspeed or
# megatron-core is missing; .whl/COMMIT records the commit for a tree that travels without .git.
#
# To check a wheel's needs against an image: unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist
# (printed below for every wheel; skip the `extra ==` lines), then `python3 -m pip show NAME ...` there.
#
# Usage: scripts/gpu_wheels.sh            (PY=path/to/python to read versions from another environment)
# Needs pip with access to PyPI or a cache holding these files; without it, it says which download failed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=.whl
TARGET_PY=3.12
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

version() {
    "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || {
        echo "gpu_wheels: $1 is not installed in $PY's environment (run make install, or set PY)" >&2; exit 2; }
}

fail_download() {
    echo "gpu_wheels: pip could not get $1 (no network and not in pip's cache?). Run this script on a machine" \
         "whose pip reaches PyPI, or put the file in pip's cache or a --find-links directory." >&2
    exit 1
}

mkdir -p "$OUT"
rm -f "$OUT"/*.whl  # one version of each: two of one package stop the install on the device
DS=$(version deepspeed)
echo "deepspeed $DS: building a pure-python wheel from the sdist (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_GDS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation \
    --no-binary deepspeed "deepspeed==$DS" -w "$OUT" || fail_download "deepspeed==$DS (sdist)"
ls "$OUT"/deepspeed-"$DS"-py3-none-any.whl >/dev/null || {
    echo "gpu_wheels: the deepspeed wheel is not pure python (py3-none-any)" >&2; exit 1; }

PINS=()
for name in megatron-core hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions \
            packaging; do
    PINS+=("$name==$(version "$name")")
done
for pin in "${PINS[@]}"; do
    echo "$pin: downloading the Python $TARGET_PY x86_64 wheel"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
        "${PLATFORMS[@]}" -d "$OUT" "$pin" || fail_download "$pin for Python $TARGET_PY"
done

{ git rev-parse HEAD 2>/dev/null || echo unknown; } | tr -d '\n' > "$OUT/COMMIT"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then printf -- '-dirty' >> "$OUT/COMMIT"; fi
echo >> "$OUT/COMMIT"

# keep .whl out of git (the device call carries it explicitly)
if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi

echo
echo "needs of each wheel (Requires-Dist, extras left out): check them against the device image"
for whl in "$OUT"/*.whl; do
    needs=$({ unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true; } \
            | sed 's/^Requires-Dist: //' | tr '\n' ',' | sed 's/,$//; s/,/, /g')
    echo "  $(basename "$whl"): ${needs:-none}"
done
size=$(du -sm "$OUT" | cut -f1)
echo
echo "$OUT: $(ls "$OUT"/*.whl | wc -l) wheels, ${size} MiB, commit $(cat "$OUT/COMMIT")"
if [ "$size" -gt 56 ]; then
    echo "gpu_wheels: $OUT is over 56 MiB: the working tree that travels must stay under 64 MiB" >&2
    exit 1
fi
echo "device command (carry [\".whl\"]): PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --out \$OUT/gpu.json 2>&1" \
     "| tee \$OUT/gpu.log"
