#!/usr/bin/env bash
# Bring onnxruntime-gpu (its CUDA execution provider) to a GPU machine that cannot reach the package
# index, in parts small enough to travel, and install it beside the CPU build that may be there.
#
#   bash bench/onnxruntime_gpu.sh split WHEEL DIR      # DIR/part-00, part-01, ... (55 MiB each) + DIR/SHA256
#   bash bench/onnxruntime_gpu.sh install DIR TARGET   # join the parts, check the SHA-256, install into TARGET
#
# Then put TARGET first on PYTHONPATH (the command prints how): `import onnxruntime` then finds the
# GPU build before the CPU `onnxruntime` of site-packages, since both install the package
# `onnxruntime`. The wheel's CUDA 13 libraries come from the nvidia-* pip packages that a CUDA 13
# torch installs; `import torch` before `import onnxruntime` loads them (onnxruntime.preload_dlls()
# looks for them beside the wheel, i.e. in TARGET, and otherwise takes the ones already loaded).
set -euo pipefail

PART_BYTES=$((55 * 1024 * 1024))

usage() {
    echo "usage: bash $0 split WHEEL DIR | install DIR TARGET" >&2
    exit 2
}

split_wheel() {  # WHEEL DIR
    local wheel=$1 dir=$2
    [ -f "$wheel" ] || { echo "error: $wheel: no such file" >&2; exit 1; }
    mkdir -p "$dir"
    rm -f "$dir"/part-* "$dir"/SHA256
    split --bytes="$PART_BYTES" --numeric-suffixes=0 --suffix-length=2 "$wheel" "$dir/part-"
    # the wheel's name travels with its hash: pip needs the name to install it
    echo "$(sha256sum "$wheel" | cut -d' ' -f1)  $(basename "$wheel")" >"$dir/SHA256"
    echo "wrote $(ls "$dir"/part-* | wc -l) parts of at most 55 MiB and $dir/SHA256:"
    ls -l "$dir"
}

install_wheel() {  # DIR TARGET
    local dir=$1 target=$2
    [ -f "$dir/SHA256" ] || { echo "error: $dir/SHA256: no such file (write the parts with \`split\`)" >&2; exit 1; }
    local name want
    want=$(cut -d' ' -f1 "$dir/SHA256")
    name=$(awk '{print $2}' "$dir/SHA256")
    work=$(mktemp -d)  # global: the EXIT trap runs after this function has returned
    trap 'rm -rf "$work"' EXIT
    cat "$dir"/part-* >"$work/$name"  # the glob sorts part-00, part-01, ... in order
    local got
    got=$(sha256sum "$work/$name" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        echo "error: the joined wheel's SHA-256 is $got, not $want: a part is missing or damaged; copy the parts again" >&2
        exit 1
    fi
    mkdir -p "$target"  # --upgrade: a second install replaces the first
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$target" "$work/$name"
    local abs
    abs=$(cd "$target" && pwd)
    echo "installed $name into $abs; use it with"
    echo "    export PYTHONPATH=$abs\${PYTHONPATH:+:\$PYTHONPATH}"
    PYTHONPATH="$abs${PYTHONPATH:+:$PYTHONPATH}" python3 -c '
try:
    import torch  # noqa: F401  loads the CUDA libraries of the nvidia-* packages onnxruntime-gpu uses
except ImportError:
    pass
import onnxruntime
onnxruntime.preload_dlls()
print("onnxruntime", onnxruntime.__version__, "from", onnxruntime.__file__)
print("providers:", onnxruntime.get_available_providers())
' || echo "warning: the installed onnxruntime does not import here; see the message above" >&2
}

[ $# -eq 3 ] || usage
case $1 in
    split) split_wheel "$2" "$3" ;;
    install) install_wheel "$2" "$3" ;;
    *) usage ;;
esac
