#!/usr/bin/env bash
# Load benchmark: the release gateway against nginx's proxy_cache and proxy_pass, same machine,
# same upstream (nginx serving static ~1 KB run bodies), servers on CPU 1 and wrk on CPU 0.
#
#   benches/load.sh [seconds=8] [connections=50]
#   env: GATEWAY_BIN=path (skip the build), BENCH_DIR (scratch, default /tmp/plextera-gateway-load)
#
# Phases: hits (1,000 warmed ended runs, skewed), pass-through (1,000 running runs, skewed), a cold
# herd (a fresh gateway hit by every connection at once), and start-up to ready. Prints req/s,
# p50/p99, upstream calls, and ratios from this one run (compare ratios, not absolute numbers).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SECS=${1:-8}
CONNS=${2:-50}
D=${BENCH_DIR:-/tmp/plextera-gateway-load}

for tool in wrk nginx curl python3 taskset; do
  command -v "$tool" >/dev/null || MISSING=1
done
if [ -n "${MISSING:-}" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light curl util-linux >/dev/null
fi
if [ -z "${GATEWAY_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
  GATEWAY_BIN="$ROOT/target/release/plextera-gateway"
fi

rm -rf "$D"; mkdir -p "$D/pcache"
python3 "$HERE/load/gen_runs.py" "$D" 1000
for conf in nginx anchors; do sed "s#__DIR__#$D#g" "$HERE/load/$conf.conf" > "$D/$conf.conf"; done
cp "$HERE/load/gateway.toml" "$D/gateway.toml"

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
on_cpu1() { taskset -c 1 "$@" & PIDS+=($!); }
wait_for() { for _ in $(seq 1 500); do curl -sf -o /dev/null "$1" && return 0; sleep 0.01; done; echo "not up: $1" >&2; exit 1; }

on_cpu1 nginx -c "$D/nginx.conf" -p "$D"
on_cpu1 nginx -c "$D/anchors.conf" -p "$D"
start_gateway() {
  local started=$(date +%s%N)
  BENCH_API_KEY=bench-secret RUST_LOG=warn taskset -c 1 "$GATEWAY_BIN" --config "$D/gateway.toml" & GATEWAY_PID=$!
  PIDS+=("$GATEWAY_PID")
  wait_for http://127.0.0.1:18093/readyz
  echo "start-up to ready: $(( ($(date +%s%N) - started) / 1000000 )) ms (includes curl's own polling)"
}
start_gateway
sleep 0.5

upstream_calls() { curl -s http://127.0.0.1:18093/metrics | awk '/^plextera_gateway_upstream_requests_total/{s+=$2} END{print s+0}'; }
declare -A RPS
load() { # name port prefix [auth]
  RUN_COUNT=1000 RUN_PREFIX=$3 RUN_AUTH=${4:-} taskset -c 0 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency \
    -s "$HERE/load/zipf.lua" "http://127.0.0.1:$2" > "$D/wrk-$1-$3.txt" 2>&1
  RPS[$1-$3]=$(awk '/Requests\/sec/{print $2}' "$D/wrk-$1-$3.txt")
  awk -v n="$1" -v p="$3" '/Requests\/sec/{r=$2} /^ +50%/{a=$2} /^ +99%/{b=$2} /Non-2xx/{e=$NF}
    END{printf "%-12s %-5s req/s=%-10s p50=%-9s p99=%-9s non2xx=%s\n", n, p, r, a, b, (e==""?0:e)}' "$D/wrk-$1-$3.txt"
}
ratio() { awk -v a="${RPS[$2]:-0}" -v b="${RPS[$3]:-0}" -v n="$1" 'BEGIN{ if (a > 0 && b > 0) printf "ratio %-32s %.2f\n", n, a / b }'; }
warm() { for i in $(seq 0 999); do curl -s -o /dev/null "http://127.0.0.1:$1/api/public/v1/workflow-runs/done-$i"; done; }

echo "== hits: 1,000 ended runs, warmed"
warm 18083; warm 18081
load gateway 18083 done
load nginx-cache 18081 done

echo "== pass-through: 1,000 running runs"
load upstream 19000 live "api-key bench-secret"
calls_before=$(upstream_calls)
load gateway 18083 live
requests=$(awk '/requests in/{print $1}' "$D/wrk-gateway-live.txt")
echo "gateway made $(( $(upstream_calls) - calls_before )) upstream calls for $requests requests (concurrent polls of one run share a call)"
load nginx-pass 18084 live

echo "== cold herd: a fresh gateway, every connection at once on 1,000 ended runs"
kill "$GATEWAY_PID"; wait "$GATEWAY_PID" 2>/dev/null || true
start_gateway
load gateway-cold 18083 done
requests=$(awk '/requests in/{print $1}' "$D/wrk-gateway-cold-done.txt")
echo "gateway made $(upstream_calls) upstream calls for $requests requests over 1,000 distinct runs"

echo "== ratios (this run)"
ratio "hit: gateway/nginx-cache" gateway-done nginx-cache-done
ratio "pass: gateway/nginx-pass" gateway-live nginx-pass-live
ratio "pass: nginx-pass/upstream" nginx-pass-live upstream-live
ratio "pass: gateway/upstream" gateway-live upstream-live
