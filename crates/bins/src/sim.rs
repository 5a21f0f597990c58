//! The device simulator behind `directcall-sim` and `directcall demo`: answers
//! like the reference sample's simulator, with latency and failure knobs.

use std::time::Duration;

use directcall_core::{Group, Method, PresenceRoot, Target};
use directcall_device::{serve, Device, DeviceOptions, Handler, HandlerError, MethodCall, Router};
use serde_json::Value;

use crate::cli::Broker;

/// How simulated devices behave.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SimOptions {
    /// Added to every answer.
    pub latency: Duration,
    /// Up to this much more, uniformly at random.
    pub jitter: Duration,
    /// Share of calls answered 500, 0.0 to 1.0.
    pub fail_rate: f64,
    /// Only these methods are known (others get 404); `None` answers every method.
    pub methods: Option<Vec<Method>>,
    /// Publish presence (retained online record and last will).
    pub presence: bool,
    /// Groups every device joins (`DeviceOptions::group`): each answers
    /// the calls to each of them too, and its presence record lists them.
    pub groups: Vec<Group>,
    /// Answer requests to every target (test tooling; see `DeviceOptions::any_target`).
    pub any_target: bool,
    /// QoS of reply publishes (`None`: the device's default).
    pub reply_qos: Option<directcall_device::QoS>,
    /// QoS of the request subscription (`None`: the device's default).
    pub subscription_qos: Option<directcall_device::QoS>,
    /// Answer with the request itself instead of the reference's sentence
    /// (what the bench's raw floor does, so both sides do the same work).
    pub echo: bool,
    /// Handlers running at once per device (`None`: the device's default).
    pub max_concurrent: Option<usize>,
    /// Requests waiting for a handler per device (`None`: the device's default).
    pub max_queued: Option<usize>,
    /// The window each device's first reconnect after a loss is spread over
    /// (`None`: the broker settings', else the device's default, 1 s).
    pub reconnect_window: Option<Duration>,
    /// The longest wait between two reconnect attempts (`None`: the broker
    /// settings', else the device's default, 30 s).
    pub reconnect_max: Option<Duration>,
}

/// The reference simulator's answer: `Your request was '<request>'. Some random response: '<float>'`.
pub fn reference_answer(request: &Value) -> String {
    let request = match request {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!(
        "Your request was '{request}'. Some random response: '{}'",
        fastrand::f64() * 1000.0
    )
}

#[derive(Debug, Clone)]
struct Answer {
    latency: Duration,
    jitter: Duration,
    fail_rate: f64,
    echo: bool,
}

#[directcall_device::async_trait]
impl Handler for Answer {
    async fn call(&self, call: MethodCall) -> Result<Value, HandlerError> {
        let extra = self.jitter.mul_f64(fastrand::f64());
        let wait = self.latency + extra;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if self.fail_rate > 0.0 && fastrand::f64() < self.fail_rate {
            return Err(HandlerError::new("simulated failure"));
        }
        if self.echo {
            return Ok(call.request);
        }
        Ok(Value::String(reference_answer(&call.request)))
    }
}

/// The simulator's router for `options`.
pub fn router(options: &SimOptions) -> Router {
    let answer = Answer {
        latency: options.latency,
        jitter: options.jitter,
        fail_rate: options.fail_rate.clamp(0.0, 1.0),
        echo: options.echo,
    };
    match &options.methods {
        None => Router::new().fallback(answer),
        Some(methods) => methods
            .iter()
            .fold(Router::new(), |r, m| r.route(m.clone(), answer.clone())),
    }
}

/// Device names for `n` devices: `{prefix}001`, `{prefix}002`, ...
///
/// # Errors
/// When `prefix` plus the number is not a valid target.
pub fn device_names(prefix: &str, n: usize) -> Result<Vec<Target>, directcall_core::Error> {
    (1..=n)
        .map(|i| Target::new(format!("{prefix}{i:03}")))
        .collect()
}

/// Starts one simulated device per target, each on its own connection, and
/// returns once all are subscribed.
///
/// # Errors
/// The first device that could not connect.
pub async fn start(
    broker: &Broker,
    targets: &[Target],
    options: &SimOptions,
) -> Result<Vec<Device>, directcall_device::Error> {
    let router = router(options);
    let mut devices = Vec::with_capacity(targets.len());
    for target in targets {
        let mut device_options = DeviceOptions::new(broker.options.clone(), target.clone());
        if let Some(signer) = &broker.signer {
            device_options = device_options.url_signer(std::sync::Arc::clone(signer));
        }
        if options.presence {
            device_options = device_options.presence(PresenceRoot::default());
        }
        if options.any_target {
            device_options = device_options.any_target();
        }
        for group in &options.groups {
            device_options = device_options.group(group.clone());
        }
        if let Some(qos) = options.reply_qos {
            device_options = device_options.reply_qos(qos);
        }
        if let Some(qos) = options.subscription_qos {
            device_options = device_options.subscription_qos(qos);
        }
        if let Some(n) = options.max_concurrent {
            device_options = device_options.max_concurrent(n);
        }
        if let Some(n) = options.max_queued {
            device_options = device_options.max_queued(n);
        }
        if let Some(window) = options.reconnect_window {
            device_options = device_options.reconnect_window(window);
        }
        if let Some(max) = options.reconnect_max {
            device_options = device_options.reconnect_max(max);
        }
        devices.push(serve(router.clone(), device_options).await?);
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_the_reference() {
        let text = reference_answer(&Value::String("my_request_1".into()));
        assert!(
            text.starts_with("Your request was 'my_request_1'. Some random response: '"),
            "{text}"
        );
        let number = text.rsplit(": '").next().unwrap().trim_end_matches('\'');
        assert!(number.parse::<f64>().is_ok(), "{number}");
        assert!(reference_answer(&serde_json::json!({"a": 1}))
            .starts_with("Your request was '{\"a\":1}'"));
    }

    #[test]
    fn names_devices() {
        let names = device_names("Device", 3).unwrap();
        let names: Vec<_> = names.iter().map(Target::as_str).collect();
        assert_eq!(names, ["Device001", "Device002", "Device003"]);
    }
}
