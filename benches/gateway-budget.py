#!/usr/bin/env python3
"""The gateway's per-call cost budget (docs/PERFORMANCE.md, "The gateway's
cost per call"): reads `perf script -F ip,sym,dso` (samples with their call
chains, leaf first) on stdin and puts each sample in one piece of a call's
cost. The innermost frame that names a piece decides; a tokio frame decides
only when no frame further out names another piece (a socket read under
hyper is HTTP's, under rumqttc the MQTT connection's). Prints each piece's
share of the samples; benches/gateway-budget.sh turns shares into CPU per
call."""
import re, sys, collections

PIECES = [
    ("audit line", r"gateway::audit::|tracing_subscriber::fmt"),
    ("console tally + live log", r"gateway::live::|hdrhistogram"),
    ("call record", r"directcall_cloud::records::"),
    ("metrics", r"metrics_exporter_prometheus|metrics_util|InvokeService::record\b|::metrics::"),
    ("reply JSON", r"gateway::mapping::render|gateway::state::respond|gateway::body::body|serde_json::value::ser|serde_json::value::to_value|<serde_json::value::Value as core::fmt::Display>"),
    ("query and JSON decoding", r"query_invocation|post_invocation|form_urlencoded|RawQuery"),
    ("admission", r"GatewayState::admit|gateway::access::|gateway::limits::|gateway::auth::|Authed as axum"),
    ("publish (request)", r"session::Shared::send|RequestPayload|try_enqueue|Link::publish|CallTopics::new|PendingTable<T>::insert|Invoke::start"),
    ("correlation (reply)", r"directcall_cloud::invoke::|session::Shared::on_reply|on_message|ReplyPayload|complete_or_return|PendingCall|invoke::reply_of|RecentIds"),
    ("MQTT connection (driver, rumqttc)", r"directcall_core::mqtt|rumqttc::|mqttbytes"),
    ("HTTP parsing, routing, writing (hyper, axum)", r"hyper::|axum::|tower::|http::|httparse|hyper_util"),
    ("gateway handler (the rest)", r"directcall_cloud::|directcall_core::"),
    ("tokio scheduler and IO driver", r"tokio::"),
]
compiled = [(n, re.compile(p)) for n, p in PIECES]

counts = collections.Counter()
total = 0
frames = []
def flush():
    global total, frames
    if not frames:
        return
    total += 1
    weak = None
    for f in frames:  # leaf first
        for name, rx in compiled:
            if rx.search(f):
                if name.startswith("tokio"):
                    weak = weak or name
                    break
                counts[name] += 1
                frames = []
                return
    if weak:
        counts[weak] += 1
        frames = []
        return
    leaf = frames[0]
    counts["other: kernel" if "[kernel" in leaf or "kallsyms" in leaf else "other: user"] += 1
    frames = []

for line in sys.stdin:
    if not line.strip():
        flush()
        continue
    if line[0] in " \t":
        frames.append(line.strip())
    else:
        flush()
flush()
for name, c in counts.most_common():
    print(f"{100.0*c/total:6.2f} %  {c:6d}  {name}")
print(f"{total} samples")
