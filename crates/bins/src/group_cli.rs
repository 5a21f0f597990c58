//! `directcall call --targets …` / `--group …`: a group call through a
//! gateway's `POST /v1/methods/{method}`, printed as a table (one row per
//! device as it answers, then the counts) or as the gateway's NDJSON lines.

use std::process::ExitCode;

use clap::Args;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::http_client::Connection;

/// The flags of a group call.
#[derive(Debug, Args)]
pub struct GroupArgs {
    /// Call every device named here: a comma-separated list
    /// (`Car1,Car2`), or a glob over the devices presence knows
    /// (`'Kiosk-*'`, with `*` or `?`).
    #[arg(long, env = "DIRECTCALL_CALL_TARGETS", conflicts_with = "group")]
    pub targets: Option<String>,
    /// Call the members of this group: one publish on the group's topic.
    #[arg(long, env = "DIRECTCALL_CALL_GROUP")]
    pub group: Option<String>,
    /// With a glob: only the devices presence says are online.
    #[arg(long, env = "DIRECTCALL_CALL_ONLINE_ONLY")]
    pub online_only: bool,
    /// The request, as JSON (a bare word is sent as a string).
    #[arg(long, env = "DIRECTCALL_CALL_REQUEST", default_value = "null")]
    pub request: String,
    /// The whole call's deadline, in milliseconds [default: the gateway's].
    #[arg(long, env = "DIRECTCALL_CALL_TIMEOUT_MS")]
    pub timeout_ms: Option<u64>,
    /// Print the gateway's NDJSON lines as they come instead of a table.
    #[arg(long, env = "DIRECTCALL_CALL_NDJSON")]
    pub ndjson: bool,
    /// The gateway's base URL.
    #[arg(
        long,
        env = "DIRECTCALL_GATEWAY",
        default_value = "http://127.0.0.1:8080"
    )]
    pub gateway: String,
}

impl GroupArgs {
    /// Whether a group call was asked for.
    pub fn is_group(&self) -> bool {
        self.targets.is_some() || self.group.is_some()
    }

    /// The body of `POST /v1/methods/{method}`.
    ///
    /// # Errors
    /// An empty list.
    pub fn body(&self) -> Result<Value, String> {
        let request = serde_json::from_str::<Value>(&self.request)
            .unwrap_or_else(|_| Value::String(self.request.clone()));
        let mut body = json!({ "request": request });
        match (&self.targets, &self.group) {
            (Some(t), _) if t.contains(['*', '?']) => {
                body["match"] = json!(t);
                body["online_only"] = json!(self.online_only);
            }
            (Some(t), _) => {
                let list: Vec<&str> = t
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                if list.is_empty() {
                    return Err("--targets names no device".into());
                }
                body["targets"] = json!(list);
            }
            (None, Some(g)) => body["group"] = json!(g),
            (None, None) => return Err("give --targets or --group".into()),
        }
        if let Some(ms) = self.timeout_ms {
            body["timeout_ms"] = json!(ms);
        }
        Ok(body)
    }
}

/// One row of the table for a device's result line.
pub fn row(result: &Value) -> String {
    let text = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let detail = if result.get("status").is_some() {
        text(&result["response"])
    } else {
        text(&result["reason"])
    };
    let latency = result["latency_ms"]
        .as_f64()
        .map(|ms| format!("{ms:.1}"))
        .unwrap_or_default();
    format!(
        "{:<24} {:<13} {:>6} {:>10}  {}",
        text(&result["target"]),
        text(&result["outcome"]),
        text(&result["status"]),
        latency,
        detail
    )
}

/// The counts line of a summary.
pub fn summary_line(summary: &Value) -> String {
    let n = |k: &str| summary[k].as_u64().unwrap_or(0);
    let expected = summary["expected"]
        .as_u64()
        .map_or_else(|| "unknown".to_owned(), |e| e.to_string());
    format!(
        "{} results (expected {expected}) in {} ms: ok {}, device_error {}, timeout {}, offline {}, refused {}",
        n("total"),
        n("elapsed_ms"),
        n("ok"),
        n("device_error"),
        n("timeout"),
        n("offline"),
        n("refused"),
    )
}

/// Runs the group call `method` with `headers` and prints it. Exit code 0
/// when every device answered ok, 1 when some did not or the gateway
/// refused, 2 for bad flags, 5 when the gateway cannot be reached.
pub async fn run(args: &GroupArgs, method: &str, mut headers: Vec<(String, String)>) -> ExitCode {
    let body = match args.body() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("directcall: {e}");
            return ExitCode::from(2);
        }
    };
    let base = args.gateway.trim_end_matches('/');
    let mut conn = match Connection::open(base).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("directcall: {e}");
            return ExitCode::from(5);
        }
    };
    headers.push(("content-type".into(), "application/json".into()));
    headers.push(("accept".into(), "application/x-ndjson".into()));
    let path = format!("/v1/methods/{method}");
    let response = match conn
        .send_streaming("POST", &path, &headers, body.to_string().into_bytes())
        .await
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("directcall: {e}");
            return ExitCode::from(5);
        }
    };
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if status != 200 {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        println!("HTTP {status}");
        println!("{}", String::from_utf8_lossy(&bytes));
        return ExitCode::from(1);
    }
    if !args.ndjson {
        println!(
            "{:<24} {:<13} {:>6} {:>10}  RESPONSE / REASON",
            "TARGET", "OUTCOME", "STATUS", "LATENCY_MS"
        );
    }
    let mut pending = Vec::new();
    let mut all_ok = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            eprintln!("directcall: the answer broke off");
            return ExitCode::from(5);
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            if args.ndjson {
                println!("{line}");
            } else if let Some(summary) = value.get("summary") {
                println!("{}", summary_line(summary));
            } else {
                println!("{}", row(&value));
            }
            if let Some(summary) = value.get("summary") {
                all_ok = Some(summary["ok"] == summary["total"]);
            }
        }
    }
    match all_ok {
        Some(true) => ExitCode::SUCCESS,
        Some(false) => ExitCode::from(1),
        None => {
            eprintln!("directcall: the answer ended without its summary line");
            ExitCode::from(5)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(targets: Option<&str>, group: Option<&str>) -> GroupArgs {
        GroupArgs {
            targets: targets.map(str::to_owned),
            group: group.map(str::to_owned),
            online_only: true,
            request: "{\"v\":1}".into(),
            timeout_ms: Some(1500),
            ndjson: false,
            gateway: "http://127.0.0.1:8080".into(),
        }
    }

    #[test]
    fn the_flags_make_the_body() {
        assert_eq!(
            args(Some("Car1, Car2,"), None).body().unwrap(),
            json!({"targets": ["Car1", "Car2"], "request": {"v": 1}, "timeout_ms": 1500})
        );
        assert_eq!(
            args(Some("Kiosk-*"), None).body().unwrap(),
            json!({"match": "Kiosk-*", "online_only": true, "request": {"v": 1}, "timeout_ms": 1500})
        );
        assert_eq!(
            args(None, Some("station-7")).body().unwrap(),
            json!({"group": "station-7", "request": {"v": 1}, "timeout_ms": 1500})
        );
        assert!(args(Some(" , "), None).body().is_err());
        let mut bare = args(None, Some("g"));
        bare.request = "reboot".into();
        assert_eq!(bare.body().unwrap()["request"], json!("reboot"));
    }

    #[test]
    fn rows_and_the_summary_read_well() {
        let ok = row(
            &json!({"target":"Car1","outcome":"ok","status":200,"response":"done","latency_ms":1.25}),
        );
        assert!(ok.starts_with("Car1 "), "{ok}");
        assert!(
            ok.contains(" ok ") && ok.contains("200") && ok.contains("1.2") && ok.ends_with("done"),
            "{ok}"
        );
        let off = row(
            &json!({"target":"Car2","outcome":"offline","reason":"presence says the device is offline"}),
        );
        assert!(
            off.ends_with("presence says the device is offline"),
            "{off}"
        );
        let s = summary_line(
            &json!({"ok":9000,"device_error":0,"timeout":0,"offline":1000,"refused":0,"total":10000,"expected":10000,"elapsed_ms":812}),
        );
        assert_eq!(s, "10000 results (expected 10000) in 812 ms: ok 9000, device_error 0, timeout 0, offline 1000, refused 0");
    }
}
