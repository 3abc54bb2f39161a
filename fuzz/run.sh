#!/usr/bin/env bash
# `make fuzz`: builds every cargo-fuzz target of fuzz/ and runs each for a bounded time from the
# committed seed corpus fuzz/corpus/<target>/.
#
#   FUZZ_SECONDS     seconds per target (default 60)
#   FUZZ_TARGETS     targets to run, space-separated (default: all, `cargo fuzz list`)
#   FUZZ_MAX_LEN     longest input libFuzzer tries (default 8192: past the targets' limits)
#   FUZZ_TARGET_DIR  the fuzz build's cargo target dir (default ~/.cache/nanogate/fuzz-target)
#
# libFuzzer adds the inputs it finds to a scratch copy of the corpus, so the tree stays clean
# (to keep a useful one, copy it into fuzz/corpus/<target>/ by hand). A crash, a panic or a hang
# fails the run: the input is kept in fuzz/artifacts/<target>/ (ignored by git) and the command
# that replays it is printed, with the input in base64 for CI logs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
CACHE_ROOT="${NANOGATE_CACHE:-$HOME/.cache/nanogate}"
seconds="${FUZZ_SECONDS:-60}"
max_len="${FUZZ_MAX_LEN:-8192}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$CACHE_ROOT/fuzz-target}"
# e2e/scripts/setup.sh installs cargo-fuzz here.
export PATH="$CACHE_ROOT/cargo-fuzz/bin:$PATH"
log() { printf '[fuzz] %s\n' "$*" >&2; }

if ! command -v cargo-fuzz >/dev/null; then
  log "cargo-fuzz not found: run e2e/scripts/setup.sh (or cargo install cargo-fuzz --locked)"
  exit 1
fi
# libFuzzer's instrumentation needs nightly; without one, the stable toolchain may be told to
# accept the unstable flags.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  cargo=(cargo +nightly)
else
  log "no nightly toolchain: using $(rustc --version) with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  cargo=(cargo)
fi
fuzz=("${cargo[@]}" fuzz)
# No AddressSanitizer: our crates forbid unsafe code, and without it the cold build of the
# sidecar's dependencies (tokio, rustls, reqwest, …) is several times faster; panics, aborts,
# hangs and out-of-memory are still caught by libFuzzer.
opts=(--fuzz-dir fuzz --target-dir "$CARGO_TARGET_DIR" --sanitizer none)

# The workspace's lock file: the targets fuzz the dependency versions nano-agent is built with
# (cargo adds libfuzzer-sys and arbitrary, and drops what the fuzz crate does not use).
cp Cargo.lock fuzz/Cargo.lock

read -r -a targets <<<"${FUZZ_TARGETS:-$("${fuzz[@]}" list --fuzz-dir fuzz | tr '\n' ' ')}"
t0=$(date +%s)
log "building ${targets[*]} (target dir $CARGO_TARGET_DIR)"
"${fuzz[@]}" build "${opts[@]}" >&2
log "built in $(( $(date +%s) - t0 ))s; running each target for ${seconds}s"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/nanogate-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in "${targets[@]}"; do
  corpus="$scratch/corpus/$target"
  artifacts="fuzz/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  seeds=0
  if [ -d "fuzz/corpus/$target" ]; then
    cp -a "fuzz/corpus/$target/." "$corpus/"
    seeds=$(find "fuzz/corpus/$target" -type f | wc -l)
  fi
  before="$scratch/$target.started"
  touch "$before"
  out="$scratch/$target.log"
  # -timeout: one input running longer counts as a hang (a failure).
  if "${fuzz[@]}" run "${opts[@]}" "$target" "$corpus" -- \
    -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -print_final_stats=1 \
    >"$out" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)
    log "$target: ok, ${runs:-?} runs in ${seconds}s (${rate:-?} exec/s), corpus $seeds -> $(find "$corpus" -type f | wc -l) inputs"
  else
    failed+=("$target")
    cp "$out" "$artifacts/fuzz.log"
    log "$target: FAILED (whole output: $artifacts/fuzz.log); what went wrong:"
    # The panic message (or the sanitizer's or libFuzzer's error), not the long backtrace.
    grep -E -A2 "panicked at|==[0-9]+==ERROR|^SUMMARY|ALARM|out-of-memory|fuzz target exited" "$out" \
      | grep -v -E "^ +[0-9]+: |^ +at |^stack backtrace" | head -n 20 >&2 || tail -n 20 "$out" >&2
    found=0
    while IFS= read -r artifact; do
      found=1
      log "$target: failing input kept at $artifact ($(wc -c <"$artifact") bytes)"
      log "  replay:   cargo +nightly fuzz run $target $artifact"
      log "  minimise: cargo +nightly fuzz tmin $target $artifact"
      if [ "$(wc -c <"$artifact")" -le 4096 ]; then
        log "  base64:   $(base64 -w0 "$artifact")"
      fi
    done < <(find "$artifacts" -type f -newer "$before" ! -name fuzz.log)
    [ "$found" = 1 ] || log "$target: no input was saved (a build or start-up error?)"
  fi
done
log "finished in $(( $(date +%s) - t0 ))s"
if [ "${#failed[@]}" -gt 0 ]; then
  log "failing targets: ${failed[*]}; once fixed, add the input to fuzz/corpus/<target>/"
  exit 1
fi
