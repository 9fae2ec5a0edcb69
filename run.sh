#!/usr/bin/env bash
# Set up, build and run mla from a fresh clone on Debian 12.
#
#   ./run.sh demo  [preset]   install what is missing, build, run examples/quickstart
#   ./run.sh test  [preset]   install what is missing, build, run the whole test suite (ctest)
#   ./run.sh test-isa [preset] build, then run the suite once per instruction set this machine
#                             offers (MLA_ISA forced: avx512 without and with AVX512-BF16, the
#                             AMX tile model), so that every kernel variant runs it all
#   ./run.sh bench [preset]   install what is missing, build, run the benchmarks (JSON to build/)
#   ./run.sh format           check the sources with clang-format (exit 1 on any difference)
#   ./run.sh plot             plot build/release/bench_mla.json (from ./run.sh bench) into docs/
#   ./run.sh convert [args]   build and run examples/convert_mha (MHA -> MLA vs GQA; without
#                             args: partial RoPE at 64, 1024, 4096 tokens), write
#                             build/release/convert.json, plot docs/convert_error.png and
#                             docs/partial_rope.png
#   ./run.sh fuzz [seconds]   fuzz the safetensors, .npy and config.json parsers with libFuzzer
#                             (clang build) for a bounded time, 60 s by default
#
# preset is one of CMakePresets.json's configure presets: release (default, g++), debug, asan
# (AddressSanitizer + UBSan, clang++), clang (release with clang++), tsan (ThreadSanitizer over
# the concurrency tests, clang++).
# Missing Debian packages are installed with apt-get (as root, or through sudo when available);
# packages already present are left alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

usage() {
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Installs every listed Debian package that is not installed yet.
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "error: missing Debian packages (${missing[*]}); run as root or install them" >&2
      exit 1
    fi
  fi
  echo "Installing missing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

build_packages() {
  local preset=$1
  local pkgs=(cmake ninja-build g++ libeigen3-dev libgtest-dev libbenchmark-dev nlohmann-json3-dev)
  case "$preset" in
    clang* | asan | tsan) pkgs+=(clang libclang-rt-14-dev) ;;
  esac
  ensure_packages "${pkgs[@]}"
}

[ $# -ge 1 ] || usage
command=$1
preset=${2:-release}

case "$command" in
  demo)
    build_packages "$preset"
    cmake --preset "$preset" >/dev/null
    cmake --build --preset "$preset" --target quickstart
    "build/$preset/examples/quickstart"
    ;;
  test)
    build_packages "$preset"
    # configure + build + ctest; ctest's summary line is the last thing printed.
    cmake --workflow --preset "$preset"
    ;;
  test-isa)
    build_packages "$preset"
    cmake --preset "$preset" >/dev/null
    cmake --build --preset "$preset"
    for isa in $("build/$preset/examples/isa_report" --available); do
      echo "== the suite on MLA_ISA=$isa"
      # Packaging and fuzzing do not run kernels; everything else does.
      MLA_ISA=$isa ctest --test-dir "build/$preset" -j2 --output-on-failure --no-tests=error \
        -E '^(package|fuzz)\.'
    done
    ;;
  bench)
    build_packages "$preset"
    cmake --preset "$preset" >/dev/null
    cmake --build --preset "$preset"
    for b in "build/$preset"/bench/bench_*; do
      [ -x "$b" ] || continue
      name=$(basename "$b")
      echo "== $name -> build/$preset/$name.json"
      "$b" --benchmark_format=console --benchmark_out="build/$preset/$name.json" \
        --benchmark_out_format=json
    done
    ;;
  fuzz)
    seconds=${2:-60}
    case "$seconds" in '' | *[!0-9]*) usage ;; esac
    build_packages clang
    cmake --preset clang >/dev/null
    cmake --build --preset clang --target fuzz_parsers
    mkdir -p build/clang/fuzz-corpus
    # New inputs are kept in build/clang/fuzz-corpus; a crash leaves crash-<hash> here.
    build/clang/tests/fuzz_parsers -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 \
      build/clang/fuzz-corpus tests/fuzz/seeds
    ;;
  plot)
    ensure_packages python3-matplotlib
    /usr/bin/python3 scripts/plot_bench.py build/release/bench_mla.json docs
    ;;
  convert)
    build_packages release
    ensure_packages python3-matplotlib
    cmake --preset release >/dev/null
    cmake --build --preset release --target convert_mha
    # Without arguments: partial RoPE (every rope_keep) at three contexts, for both plots.
    args=("${@:2}")
    [ ${#args[@]} -eq 0 ] && args=(--rope-keep 16,8,4,0 --context 64,1024,4096)
    build/release/examples/convert_mha --json build/release/convert.json "${args[@]}"
    /usr/bin/python3 scripts/plot_convert.py build/release/convert.json docs
    ;;
  format)
    ensure_packages clang-format
    find include tests bench examples \( -name '*.hpp' -o -name '*.cpp' -o -name '*.inl' \) -print0 |
      xargs -0 clang-format --dry-run --Werror
    echo "clang-format: all sources formatted"
    ;;
  *)
    usage
    ;;
esac
