//! A NATS cluster with MQTT listeners, for fleet tests: N `nats-server`
//! processes on free ports, routed to each other, each with its own
//! JetStream store in a temp dir (NATS speaks MQTT only with JetStream).

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::free_port;
use directcall_core::broker::BrokerOptions;

static INSTANCE: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
struct Node {
    child: Option<Child>,
    mqtt_port: u16,
    config: PathBuf,
    log: PathBuf,
}

/// A cluster of `nats-server` processes, killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    binary: PathBuf,
}

impl NatsCluster {
    /// Starts `n` nodes and returns once every MQTT listener accepts
    /// connections. `Ok(None)` when the binary is not installed. Allow a few
    /// seconds more for the JetStream leader before the first subscription
    /// (see [`NatsCluster::wait_ready`]).
    ///
    /// # Errors
    /// When it is installed but a node does not listen within 10 s.
    pub fn start(n: usize) -> std::io::Result<Option<Self>> {
        let Some(binary) = crate::program::NATS_SERVER.find() else {
            return Ok(None);
        };
        let dir = std::env::temp_dir().join(format!(
            "directcall-nats-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
            .collect::<std::io::Result<_>>()?;
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster, _)| format!("nats-route://127.0.0.1:{cluster}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, cluster, mqtt)) in ports.iter().enumerate() {
            let store = dir.join(format!("n{i}"));
            fs::create_dir_all(&store)?;
            let config = dir.join(format!("n{i}.conf"));
            // One node is a plain server: a cluster of one never elects a
            // JetStream leader, so it would never take MQTT subscriptions.
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: directcall, listen: 127.0.0.1:{cluster}, routes: [{}] }}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            fs::write(
                &config,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{client}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     {cluster}mqtt {{ listen: 127.0.0.1:{mqtt} }}\n",
                    store.display(),
                ),
            )?;
            nodes.push(Node {
                child: None,
                mqtt_port: *mqtt,
                config,
                log: dir.join(format!("n{i}.log")),
            });
        }
        let mut cluster = NatsCluster { nodes, dir, binary };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        Ok(Some(cluster))
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let node = &mut self.nodes[i];
        let log = File::options().create(true).append(true).open(&node.log)?;
        node.child = Some(
            Command::new(&self.binary)
                .arg("-c")
                .arg(&node.config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], node.mqtt_port));
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > until {
                return Err(std::io::Error::other(format!(
                    "nats node {i} did not listen on {addr} within 10 s: {}",
                    fs::read_to_string(&node.log).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until MQTT subscriptions work on every node (the JetStream
    /// leader is elected), at most `timeout`; returns whether they do.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        for i in 0..self.nodes.len() {
            loop {
                if tokio::time::Instant::now() > until {
                    return false;
                }
                if probe_subscribe(&self.options(i)).await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        true
    }

    /// Whether node `i` takes a new MQTT connection and a QoS 1
    /// subscription now (a bare client, within 3 s).
    pub async fn accepts_mqtt(&self, i: usize) -> bool {
        probe_subscribe(&self.options(i)).await
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Settings for node `i` alone, with fast reconnects.
    pub fn options(&self, i: usize) -> BrokerOptions {
        fast(BrokerOptions::new("127.0.0.1", self.nodes[i].mqtt_port))
    }

    /// Settings for every node, starting with node `first` and going round:
    /// the connection fails over to the next when one is lost.
    pub fn options_from(&self, first: usize) -> BrokerOptions {
        let n = self.nodes.len();
        let urls: Vec<String> = (0..n)
            .map(|k| format!("mqtt://127.0.0.1:{}", self.nodes[(first + k) % n].mqtt_port))
            .collect();
        let options = BrokerOptions::from_urls(urls.iter().map(String::as_str))
            .unwrap_or_else(|_| BrokerOptions::new("127.0.0.1", self.nodes[first].mqtt_port));
        fast(options)
    }

    /// The MQTT URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    /// Freezes node `i` with SIGSTOP: its sockets stay open and nothing is
    /// answered, as a hung node does; [`NatsCluster::thaw`] resumes it.
    pub fn freeze(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Resumes node `i` after [`NatsCluster::freeze`] (SIGCONT).
    pub fn thaw(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        crate::process::signal(self.nodes[i].child.as_ref(), signal);
    }

    /// SIGKILLs node `i`, as a crash would.
    pub fn kill(&mut self, i: usize) {
        crate::process::kill(&mut self.nodes[i].child);
    }

    /// Starts node `i` again with its config and store.
    ///
    /// # Errors
    /// When it does not listen again within 10 s.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// What node `i` logged so far.
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }
}

fn fast(mut o: BrokerOptions) -> BrokerOptions {
    o.backoff_min = Some(Duration::from_millis(50));
    o.backoff_max = Some(Duration::from_millis(500));
    // NATS hands a client id to another node only after giving up on the
    // dead node's session (docs/SCALING.md).
    o.fresh_client_id_on_failover = true;
    o
}

/// Whether a bare client can subscribe on the broker (SUBACK success).
async fn probe_subscribe(broker: &BrokerOptions) -> bool {
    use rumqttc::{AsyncClient, Event, Packet, QoS, SubscribeReasonCode};
    let id = format!("probe-{:08x}", fastrand::u32(..));
    let Ok((mqtt, net)) = crate::options::v311(broker, &id) else {
        return false;
    };
    let (client, mut events) = AsyncClient::new(mqtt, 10);
    events.set_network_options(net);
    let result = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("directcall-probe/ready", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    return matches!(
                        ack.return_codes.first(),
                        Some(SubscribeReasonCode::Success(_))
                    );
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = client.try_disconnect();
    result
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
