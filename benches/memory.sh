#!/usr/bin/env bash
# Memory benchmark: what cached runs cost in resident memory, and whether the size bound holds
# under churn.
#
#   benches/memory.sh [runs=100000]
#   env: GATEWAY_BIN=path (skip the build), BENCH_DIR (scratch, default /tmp/plextera-gateway-memory)
#
# 1. Fill: a gateway with room for everything fetches RUNS distinct ~1 KB ended runs once each;
#    reports (RSS after - RSS idle) / body bytes cached. Target: <= 1.5.
# 2. Churn: a gateway with cache.max_size = 16MiB fetches 2 x RUNS distinct runs (about 10 x its
#    bound at the default RUNS); reports RSS after each tenth. Target: flat once the cache is full.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
RUNS=${1:-100000}
D=${BENCH_DIR:-/tmp/plextera-gateway-memory}
for tool in wrk nginx curl python3; do command -v "$tool" >/dev/null || MISSING=1; done
if [ -n "${MISSING:-}" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light curl >/dev/null
fi
if [ -z "${GATEWAY_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
  GATEWAY_BIN="$ROOT/target/release/plextera-gateway"
fi
mkdir -p "$D"
# Generating the bodies takes minutes; a previous run's are reused when there are enough.
if [ "$(find "$D/runs" -name 'done-*' 2>/dev/null | wc -l)" -lt $((2 * RUNS)) ]; then
  rm -rf "$D/runs"
  python3 "$HERE/load/gen_runs.py" "$D" $((2 * RUNS))
fi
sed "s#__DIR__#$D#g" "$HERE/load/nginx.conf" > "$D/nginx.conf"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
nginx -c "$D/nginx.conf" -p "$D" & PIDS+=($!)

rss_kib() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
metric() { curl -s http://127.0.0.1:18093/metrics | awk -v m="$1" '$1 == m {print $2}'; }
start_gateway() { # max_size
  { cat "$HERE/load/gateway.toml"; printf '\n[cache]\nmax_size = "%s"\n' "$1"; } > "$D/gateway.toml"
  BENCH_API_KEY=bench-secret RUST_LOG=warn "$GATEWAY_BIN" --config "$D/gateway.toml" & GATEWAY_PID=$!
  PIDS+=("$GATEWAY_PID")
  for _ in $(seq 1 500); do curl -sf -o /dev/null http://127.0.0.1:18093/readyz && return; sleep 0.01; done
  echo "gateway not ready" >&2; exit 1
}
upstream_calls() { local calls; calls=$(metric 'plextera_gateway_upstream_requests_total{code="200"}'); echo "${calls:-0}"; }
fetch() { # start count: each run once; wrk's thread stops after the last id, so stop wrk once
  # the gateway has fetched them all (wrk spends one generated request on its own set-up).
  local target=$(( $(upstream_calls) + $2 - 1 ))
  RUN_PREFIX=done RUN_START=$1 RUN_COUNT=$2 wrk -t1 -c16 -d600s -s "$HERE/load/sequential.lua" http://127.0.0.1:18083 >/dev/null &
  local wrk_pid=$!
  while [ "$(upstream_calls)" -lt "$target" ]; do sleep 0.2; done
  kill "$wrk_pid"; wait "$wrk_pid" 2>/dev/null || true
}

echo "== fill: $RUNS distinct ended runs, cache large enough for all"
start_gateway 1GiB
idle=$(rss_kib "$GATEWAY_PID")
fetch 0 "$RUNS"
entries=$(metric plextera_gateway_cache_entries); bytes=$(metric plextera_gateway_cache_size_bytes)
full=$(rss_kib "$GATEWAY_PID")
awk -v i="$idle" -v f="$full" -v b="$bytes" -v e="$entries" 'BEGIN {
  printf "idle RSS %.1f MiB, after %.1f MiB; %d runs, %.1f MiB of bodies and ids cached\n", i/1024, f/1024, e, b/1048576
  printf "RSS growth / cached bytes = %.2f (target <= 1.5); %.0f bytes of overhead per run\n", (f-i)*1024/b, ((f-i)*1024-b)/e }'
kill "$GATEWAY_PID"; wait "$GATEWAY_PID" 2>/dev/null || true

echo "== churn: $((2 * RUNS)) distinct runs through a 16MiB cache"
start_gateway 16MiB
step=$(( 2 * RUNS / 10 ))
for tenth in $(seq 0 9); do
  fetch $(( tenth * step )) "$step"
  printf "after %7d runs: RSS %6.1f MiB, cache %5.1f MiB in %s runs\n" $(( (tenth + 1) * step )) \
    "$(awk -v r="$(rss_kib "$GATEWAY_PID")" 'BEGIN{print r/1024}')" \
    "$(awk -v b="$(metric plextera_gateway_cache_size_bytes)" 'BEGIN{print b/1048576}')" \
    "$(metric plextera_gateway_cache_entries)"
done
