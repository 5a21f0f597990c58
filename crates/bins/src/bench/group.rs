//! `directcall bench --mode group`: group calls to N devices, each until
//! every device answered, against a floor of bare rumqttc in the same run
//! (`--compare-raw`): one publish on the group's topic (or one per device
//! for `--group-form list`) and the N echoes counted, every leg QoS 0.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use directcall_cloud::{GroupInvocation, Requester};
use directcall_core::broker::BrokerOptions;
use directcall_core::{Group, GroupTopics, MessageId, Method, Prefix, Target};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::cli::BoxError;

/// How the devices of a group call are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupForm {
    /// A list of every device: one request each.
    List,
    /// A glob over the devices presence knows (`{prefix}*`): one request
    /// each.
    Match,
    /// A named group: one publish.
    Group,
}

/// One group call's figures.
#[derive(Debug, Clone, Copy)]
pub struct Fanout {
    /// From the call to its first result.
    pub first: Duration,
    /// From the call to its last result.
    pub last: Duration,
    /// Devices that answered.
    pub answered: usize,
    /// Devices reported offline (directcall only: the floor cannot know).
    pub offline: usize,
}

/// The median of each figure over `runs`.
pub fn median(runs: &[Fanout]) -> Fanout {
    let mid = |f: fn(&Fanout) -> Duration| {
        let mut v: Vec<Duration> = runs.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let mut answered: Vec<usize> = runs.iter().map(|r| r.answered).collect();
    answered.sort_unstable();
    let mut offline: Vec<usize> = runs.iter().map(|r| r.offline).collect();
    offline.sort_unstable();
    Fanout {
        offline: offline.get(offline.len() / 2).copied().unwrap_or_default(),
        first: mid(|r| r.first),
        last: mid(|r| r.last),
        answered: answered
            .get(answered.len() / 2)
            .copied()
            .unwrap_or_default(),
    }
}

/// The group call `form` names for `targets` (devices `{prefix}001…`).
///
/// # Errors
/// A name that breaks the topic rules.
pub fn invocation(
    form: GroupForm,
    group: &Group,
    prefix: &str,
    targets: &[Target],
    payload: &str,
    timeout: Duration,
) -> Result<GroupInvocation, BoxError> {
    let call = match form {
        GroupForm::List => GroupInvocation::targets(targets, "bench", payload)?,
        GroupForm::Match => GroupInvocation::matching(&format!("{prefix}*"), "bench", payload)?,
        GroupForm::Group => GroupInvocation::group(group.as_str(), "bench", payload)?,
    };
    Ok(call.timeout(timeout))
}

/// One group call through `requester`, to the end.
///
/// # Errors
/// A call the requester refused.
pub async fn directcall(
    requester: &Requester,
    call: GroupInvocation,
) -> Result<(Fanout, Vec<directcall_cloud::DeviceResult>), BoxError> {
    let started = Instant::now();
    let mut running = requester.invoke_group(call).await?;
    let mut first = None;
    let mut results = Vec::new();
    while let Some(r) = running.next().await {
        first.get_or_insert_with(|| started.elapsed());
        results.push(r);
    }
    let last = started.elapsed();
    Ok((
        Fanout {
            first: first.unwrap_or(last),
            last,
            answered: running.summary().ok,
            offline: running.summary().offline,
        },
        results,
    ))
}

/// The floor: a bare rumqttc client, QoS 0 on every leg, subscribed to
/// its reply topics.
pub struct RawFanout {
    client: AsyncClient,
    prefix: Prefix,
    replies: mpsc::UnboundedReceiver<String>,
}

impl RawFanout {
    /// Connects to `broker`'s first endpoint (plain TCP) and subscribes.
    ///
    /// # Errors
    /// When it cannot connect or subscribe within 10 s.
    pub async fn connect(broker: &BrokerOptions) -> Result<Self, BoxError> {
        let run = format!("{:06x}", fastrand::u32(..) & 0xff_ffff);
        let prefix = Prefix::new(format!("rawgroup-{run}"))?;
        let (client, mut eventloop) = super::floor_client(broker, prefix.as_str())?;
        let (tx, replies) = mpsc::unbounded_channel();
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p.topic).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        client
            .subscribe(format!("{prefix}/+/+/+/ack"), QoS::AtMostOnce)
            .await?;
        tokio::time::timeout(Duration::from_secs(10), ready.recv())
            .await
            .map_err(|_| "the raw floor's subscription was not answered in 10 s")?;
        Ok(RawFanout {
            client,
            prefix,
            replies,
        })
    }

    /// One fan-out: the request(s) `form` makes, and the replies counted
    /// until every target's came or `timeout` passed.
    ///
    /// # Errors
    /// When a publish cannot be queued.
    pub async fn call(
        &mut self,
        form: GroupForm,
        group: &Group,
        targets: &[Target],
        payload: &str,
        timeout: Duration,
    ) -> Result<Fanout, BoxError> {
        let id = MessageId::new();
        let body = json!({"id": id.to_string(), "request": payload, "timestamp": directcall_core::deadline::unix_millis(std::time::SystemTime::now()).to_string()})
            .to_string();
        let started = Instant::now();
        match form {
            GroupForm::Group => {
                let topics = GroupTopics::new(
                    group.clone(),
                    Method::new("bench")?,
                    self.prefix.clone(),
                    id,
                )?;
                self.client
                    .publish(topics.request_topic(), QoS::AtMostOnce, false, body)
                    .await?;
            }
            GroupForm::List | GroupForm::Match => {
                for t in targets {
                    self.client
                        .publish(
                            format!("{t}/bench/{}/{id}", self.prefix),
                            QoS::AtMostOnce,
                            false,
                            body.clone(),
                        )
                        .await?;
                }
            }
        }
        let id = id.to_string();
        let mut seen = HashSet::with_capacity(targets.len());
        let mut first = None;
        let deadline = tokio::time::Instant::now() + timeout;
        while seen.len() < targets.len() {
            let Ok(Some(topic)) = tokio::time::timeout_at(deadline, self.replies.recv()).await
            else {
                break;
            };
            // {prefix}/{id}/{target}/bench/ack
            let mut levels = topic.split('/').skip(1);
            if levels.next() != Some(id.as_str()) {
                continue;
            }
            if let Some(target) = levels.next() {
                if seen.insert(target.to_owned()) {
                    first.get_or_insert_with(|| started.elapsed());
                }
            }
        }
        let last = started.elapsed();
        Ok(Fanout {
            first: first.unwrap_or(last),
            last,
            answered: seen.len(),
            offline: 0,
        })
    }
}

/// The figures as JSON.
pub fn fanout_json(f: &Fanout) -> Value {
    json!({
        "first_ms": f.first.as_secs_f64() * 1e3,
        "last_ms": f.last.as_secs_f64() * 1e3,
        "answered": f.answered,
        "offline": f.offline,
    })
}
