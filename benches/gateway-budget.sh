#!/usr/bin/env bash
# The gateway's CPU per call and where it goes (docs/PERFORMANCE.md, "The
# gateway's cost per call"). Starts a private Mosquitto (loopback, a free
# port, set_tcp_nodelay), 16 echo devices in a directcall-sim process, and
# `directcall serve` with its defaults (call records, the console, metrics,
# the audit line written to a file) but --presence off and no per-target
# bound, as the HTTP floor has neither; then loads the gateway from
# `directcall bench --url … --concurrency 64` for SECONDS while `perf record`
# samples the gateway process. Prints the calls made, the gateway's CPU time
# per call (utime + stime from /proc, over the whole load), and each piece's
# share of the samples (benches/gateway-budget.py) in µs per call.
#
#   benches/gateway-budget.sh [--bin DIR] [--seconds N] [--keep DIR] [--floor]
#
# --floor profiles the HTTP floor instead (the bare HTTP→MQTT bridge of
# `directcall bench --mode http --compare-raw`, served alone by `directcall
# bench --serve-floor`), under the same load, for the same breakdown.
#
# DIR holds directcall and directcall-sim (default target/release-symbols:
# `cargo build --profile release-symbols -p directcall-bins --bin directcall
# --bin directcall-sim`, the release build with the symbols perf needs).
# Everything it starts it stops. Needs mosquitto, perf and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release-symbols
seconds=20
keep=
floor=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --floor) floor=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
here=$(pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$keep" ]; then mkdir -p "$keep" && cp -r "$work"/. "$keep"/; fi
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mqtt=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n' "$mqtt" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 & pids+=($!)
sleep 0.5
RUST_LOG=warn "$bin/directcall-sim" --broker "mqtt://127.0.0.1:$mqtt" --devices 16 --id-prefix Device --echo > "$work/sim.log" 2>&1 & pids+=($!)
http=$(free_port)
if [ -n "$floor" ]; then
  RUST_LOG=warn "$bin/directcall" bench --broker "mqtt://127.0.0.1:$mqtt" --serve-floor > "$work/floor.out" 2> "$work/gateway.log" & gw=$!; pids+=($gw)
  for _ in $(seq 100); do
    http=$(sed -n 's|^http://127.0.0.1:||p' "$work/floor.out")
    [ -n "$http" ] && break
    sleep 0.1
  done
else
  "$bin/directcall" serve --broker "mqtt://127.0.0.1:$mqtt" --listen "127.0.0.1:$http" \
    --presence off --max-in-flight-per-target 0 > "$work/gateway.out" 2> "$work/gateway.log" & gw=$!; pids+=($gw)
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$http/healthz" > /dev/null 2>&1 && break
    sleep 0.1
  done
fi
sleep 1
cpu() { awk '{print $14 + $15}' "/proc/$gw/stat"; }
tick=$(getconf CLK_TCK)
load() {
  "$bin/directcall" bench --broker "mqtt://127.0.0.1:$mqtt" --url "http://127.0.0.1:$http" \
    --external-devices --devices 16 --mode http --concurrency 64 --duration "$seconds" --json \
    2>> "$work/bench.log" > "$1"
}
# CPU per call from a run without the profiler (its unwinding costs the
# sampled process too), the shares from a second run under it.
before=$(cpu)
load "$work/bench.json"
after=$(cpu)
perf record -F 999 --call-graph dwarf,16384 -o "$work/perf.data" -p "$gw" -- sleep "$((seconds + 1))" > "$work/perf.log" 2>&1 & perf=$!
sleep 0.5
load "$work/bench-profiled.json"
wait "$perf" || true
calls=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["ok"] + j["errors"])' "$work/bench.json")
perf script -i "$work/perf.data" -F ip,sym,dso 2> /dev/null > "$work/perf.txt"
python3 - "$work" "$calls" "$((after - before))" "$tick" "$here/benches/gateway-budget.py" <<'PY'
import json, subprocess, sys
work, calls, ticks, tick, script = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
bench = json.load(open(f"{work}/bench.json"))
us = ticks / tick * 1e6 / calls
print(f"calls {calls} ({bench['calls_per_s']:.0f}/s, p50 {bench['p50_us']} µs), gateway CPU {ticks / tick:.2f} s: {us:.1f} µs per call")
out = subprocess.run([sys.executable, script], stdin=open(f"{work}/perf.txt"), capture_output=True, text=True).stdout
for line in out.splitlines():
    parts = line.split(None, 3)
    if len(parts) == 4 and parts[1] == "%":
        print(f"{float(parts[0]):6.2f} %  {float(parts[0]) * us / 100:5.1f} µs  {parts[3]}")
    else:
        print(line)
PY
