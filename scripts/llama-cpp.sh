#!/usr/bin/env bash
# Fetch and build the llama.cpp that lora-doctor's GGUF goldens come from (idempotent).
#
#   scripts/llama-cpp.sh          # download, verify, extract, build; prints the llama.cpp source dir
#   scripts/llama-cpp.sh --dir    # only print the source dir (fails if it was never extracted)
#
# Source: the llama-cpp-python 0.3.36 sdist from PyPI (it vendors llama.cpp: ggml C, gguf-py,
# convert_hf_to_gguf.py), fetched with pip and checked against the pinned sha256. The CPU tools
# (llama-quantize, llama-export-lora, llama-perplexity, llama-completion, llama-gguf) are built with cmake
# into $cache/llama-cpp/build/bin. Cache dir: ${LD_CACHE:-$HOME/.cache/lora-doctor}. Finished steps
# are skipped: a build whose log ends in `done 0` is not redone.
set -euo pipefail

version="0.3.36"
sdist="llama_cpp_python-$version.tar.gz"
sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
cache="${LD_CACHE:-$HOME/.cache/lora-doctor}/llama-cpp"
src="$cache/llama_cpp_python-$version/vendor/llama.cpp"
build="$cache/build"
log="$cache/cmake.log"
tools=(llama-quantize llama-export-lora llama-perplexity llama-completion llama-gguf)

if [[ "${1:-}" == "--dir" ]]; then
    [[ -f "$src/ggml/src/ggml-quants.c" ]] || { echo "llama.cpp not extracted; run $0" >&2; exit 1; }
    echo "$src"
    exit 0
fi

mkdir -p "$cache"
if [[ ! -f "$cache/$sdist" ]]; then
    echo "downloading $sdist (pip)" >&2
    python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        "llama-cpp-python==$version" -d "$cache" >&2
fi
echo "$sha256  $cache/$sdist" | sha256sum -c --quiet - || {
    echo "$cache/$sdist does not have the pinned sha256; delete it and rerun" >&2
    exit 1
}
if [[ ! -f "$src/ggml/src/ggml-quants.c" ]]; then
    echo "extracting $sdist" >&2
    tar -xzf "$cache/$sdist" -C "$cache"
fi
if [[ "$(tail -n1 "$log" 2>/dev/null || true)" != "done 0" ]]; then
    echo "building ${tools[*]} into $build/bin (log: $log)" >&2
    {
        cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
            -DGGML_CUDA=OFF -DGGML_METAL=OFF && \
        cmake --build "$build" -j "$(nproc)" --target "${tools[@]}"
    } >"$log" 2>&1 && status=0 || status=$?
    echo "done $status" >>"$log"
    [[ $status -eq 0 ]] || { echo "build failed, see $log" >&2; exit "$status"; }
fi
echo "$src"
