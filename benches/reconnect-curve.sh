#!/usr/bin/env bash
# The reconnect curve of a simulated fleet after a broker restart
# (docs/SCALING.md, "Reconnect storms"): N devices in one directcall-sim
# process on a private Mosquitto (loopback, a free port), the broker killed
# with SIGKILL, kept down DOWN seconds, started again on the same port; then
# when each device was connected again, from the devices' own log (one
# `connected` line per CONNACK, microsecond timestamps) and, as a check,
# from the broker's log (one `New client connected` line per client, to the
# second).
#
#   benches/reconnect-curve.sh [--sim PATH] [--devices N] [--down SECONDS]
#                              [--watch SECONDS] [--keep-logs DIR]
#                              [-- SIM FLAGS...]
#
# e.g. `cargo build --release -p directcall-bins --bin directcall-sim &&
# benches/reconnect-curve.sh -- --reconnect-max 30`. Everything it starts
# it stops, and its files go when it exits. Needs mosquitto and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

sim=target/release/directcall-sim
devices=10000
down=5
watch=90
keep=
while [ $# -gt 0 ]; do
  case "$1" in
    --sim) sim=$2; shift 2 ;;
    --devices) devices=$2; shift 2 ;;
    --down) down=$2; shift 2 ;;
    --watch) watch=$2; shift 2 ;;
    --keep-logs) keep=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
[ -x "$sim" ] || { echo "no simulator at $sim: cargo build --release -p directcall-bins --bin directcall-sim" >&2; exit 2; }
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$mosquitto" ] || { echo "mosquitto is not installed" >&2; exit 2; }
if [ "$(ulimit -n)" -lt $((devices + 100)) ]; then
  ulimit -n $((devices + 1000)) 2>/dev/null || {
    echo "ulimit -n is $(ulimit -n): too low for $devices connections" >&2; exit 2; }
fi

dir=$(mktemp -d)
broker_pid=
sim_pid=
cleanup() {
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
  [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  [ -n "$keep" ] && mkdir -p "$keep" && cp "$dir"/*.log "$dir"/*.conf "$keep"/
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$dir/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
max_connections -1
set_tcp_nodelay true
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages true
EOF
start_broker() {
  # stderr is opened here, as root: Mosquitto drops privileges before
  # it would open a log file itself.
  "$mosquitto" -c "$dir/mosquitto.conf" 2>>"$dir/broker.log" &
  broker_pid=$!
}
start_broker
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

echo "$devices devices on mqtt://127.0.0.1:$port ($sim $*)"
RUST_LOG=warn,directcall_core::mqtt::driver=debug DIRECTCALL_LOG_FORMAT=json \
  "$sim" --broker "mqtt://127.0.0.1:$port" --devices "$devices" --id-prefix D "$@" \
  >"$dir/sim.out" 2>"$dir/sim.log" &
sim_pid=$!
connected() { grep -c '"message":"connected"' "$dir/sim.log" || true; }
deadline=$((SECONDS + 600))
until grep -qs "Waiting for command" "$dir/sim.out"; do
  kill -0 "$sim_pid" 2>/dev/null || { echo "the simulator exited:" >&2; tail -5 "$dir/sim.log" >&2; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "not all connected within 600 s ($(connected))" >&2; exit 1; }
  sleep 1
done
echo "all $(connected) connected; killing the broker (SIGKILL) for ${down} s"
sleep 2
before=$(connected)
killing=$(date +%s.%N)
kill -KILL "$broker_pid"
wait "$broker_pid" 2>/dev/null || true
killed=$(date +%s.%N)
sleep "$down"
start_broker
up=$(date +%s.%N)
deadline=$((SECONDS + watch))
while [ $(($(connected) - before)) -lt "$devices" ] && [ $SECONDS -lt $deadline ]; do
  sleep 0.5
done
sleep 1

python3 - "$dir" "$killing" "$killed" "$up" "$devices" <<'EOF'
import collections, json, re, sys
from datetime import datetime
d = sys.argv[1]
killing, killed, up = map(float, sys.argv[2:5])
n = int(sys.argv[5])

def epoch(ts):
    # RFC 3339 with microseconds and Z, as tracing-subscriber writes it
    ts = ts.rstrip("Z")
    head, _, frac = ts.partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))

back, failures, refused_late = [], collections.Counter(), 0
for line in open(f"{d}/sim.log"):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    t = epoch(e["timestamp"])
    if t < killing:
        continue
    msg = e.get("message", "")
    if msg == "connected":
        back.append(t - up)
    elif msg.startswith("broker connection:"):
        # "broker connection: URL: WHY; trying URL in N ms"
        why = re.sub(r"; trying .*", "", msg).split(": ", 2)[-1]
        failures[why] += 1
        refused_late += t >= up and "refused" in why
back.sort()
print(f"broker down {up - killed:.2f} s; devices connected again: {len(back)} of {n}")
# Each device logs its loss as one failure; the rest are failed attempts.
print(f"failed connect attempts: {sum(failures.values()) - n} besides the {n} losses "
      f"({refused_late} refused after the broker was started again, before it listened); by cause, losses included: "
      + ", ".join(f"{c} x {why}" for why, c in failures.most_common(4)))
if back:
    def at(p):
        return back[min(len(back) - 1, max(0, -(-len(back) * p // 100) - 1))]
    print("time after the broker's return to 10/50/90/100 % of devices back: "
          + " / ".join(f"{at(p):.2f} s" for p in (10, 50, 90, 100)))
    per_s = collections.Counter(int(t // 1) for t in back)
    peak_s = max(per_s.values())
    per_100 = collections.Counter(int(t * 10 // 1) for t in back)
    print(f"peak: {peak_s} connects in one second, {max(per_100.values())} in 100 ms")
    print("connects per second after the return (devices' log):")
    for s in range(min(per_s), max(per_s) + 1):
        print(f"  {s:>3}-{s + 1:<3} s {per_s.get(s, 0):>6}")
# The broker's view, to the second: "<epoch>: New client connected from ... as D00001 ..."
clients = collections.Counter()
for line in open(f"{d}/broker.log"):
    m = re.match(r"(\d+): New client connected from \S+ as (\S+)", line)
    if m and int(m.group(1)) >= int(up):
        clients[int(m.group(1)) - int(up)] += 1
if clients:
    print(f"the broker's log: {sum(clients.values())} clients connected after its restart; per wall-clock second from it: "
          + ", ".join(f"+{s}: {c}" for s, c in sorted(clients.items())))
EOF
