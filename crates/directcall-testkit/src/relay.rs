//! A TCP relay between MQTT clients and a broker that can cut connections
//! at exact moments: network faults at the process level, without `tc` or
//! iptables (neither is on these machines).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use directcall_core::broker::BrokerOptions;

/// MQTT control packet type of SUBSCRIBE (fixed header `0x82`).
const SUBSCRIBE: u8 = 8;

#[derive(Debug, Default)]
struct Faults {
    /// Cut the connection instead of forwarding the n-th SUBSCRIBE (1-based)
    /// of the next connection; 0 means never.
    cut_at_subscribe: AtomicUsize,
    connections: AtomicUsize,
    /// Swallow every byte both ways, sockets left open: a hung broker or a
    /// black-holed link.
    black_hole: AtomicBool,
    /// Delay every byte this many milliseconds each way.
    latency_ms: AtomicU64,
    /// At most this many bytes a second each way (0: no limit).
    bytes_per_s: AtomicU64,
    /// Deliver one byte at a time, this many milliseconds apart (0: off).
    drip_ms: AtomicU64,
    /// Close the broker-to-client direction of every open connection (a
    /// FIN to the client) and forward the other way only: half-open.
    half_open: AtomicBool,
    /// Reset open connections (RST) halfway through the next packet each
    /// sends to its client.
    reset_mid_packet: AtomicBool,
}

/// What the delivering half of a connection does with a chunk.
enum Delivered {
    Ok,
    /// The writer failed: the connection is over.
    Failed,
    /// Reset the connection now.
    Reset,
}

/// A relay on a free port of 127.0.0.1 to `upstream`.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    faults: Arc<Faults>,
    cut: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

impl Relay {
    /// Starts relaying to `upstream`.
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay port");
        let addr = listener.local_addr().expect("relay address");
        let faults = Arc::new(Faults::default());
        let (cut, _) = watch::channel(0u64);
        let (stop, mut stopped) = watch::channel(false);
        let (faults2, cut2) = (Arc::clone(&faults), cut.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                let (faults, cut) = (Arc::clone(&faults2), cut2.subscribe());
                tokio::spawn(relay(client, upstream, faults, cut));
            }
        });
        Relay {
            addr,
            faults,
            cut,
            stop,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Settings for clients of the relay, with fast reconnects.
    pub fn options(&self) -> BrokerOptions {
        let mut o = BrokerOptions::new("127.0.0.1", self.addr.port());
        o.backoff_min = Some(std::time::Duration::from_millis(50));
        o.backoff_max = Some(std::time::Duration::from_millis(500));
        o
    }

    /// On the next connection, cut it (both ways, at once) when the client
    /// sends its `n`-th SUBSCRIBE, which never reaches the broker.
    pub fn cut_at_subscribe(&self, n: usize) {
        self.faults.cut_at_subscribe.store(n, SeqCst);
    }

    /// From now on, swallows every byte both ways with the sockets left
    /// open (`true`), as a hung broker or a black-holed link does; or
    /// forwards again (`false`; what was swallowed is lost).
    pub fn black_hole(&self, on: bool) {
        self.faults.black_hole.store(on, SeqCst);
    }

    /// Delays every byte by `latency` each way from now on (zero: none).
    pub fn latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.faults.latency_ms.store(ms, SeqCst);
    }

    /// Limits each direction to `bytes_per_s` (0: no limit) from now on.
    pub fn bandwidth(&self, bytes_per_s: u64) {
        self.faults.bytes_per_s.store(bytes_per_s, SeqCst);
    }

    /// Delivers one byte at a time, `gap` apart, from now on: packets
    /// arrive in slow partial pieces (zero: off).
    pub fn drip(&self, gap: Duration) {
        let ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
        self.faults.drip_ms.store(ms, SeqCst);
    }

    /// Half-opens the connections: what the broker sends no longer reaches
    /// the client, which gets a FIN, while what the client sends still
    /// reaches the broker (`true`); new connections are whole again with
    /// `false`.
    pub fn half_open(&self, on: bool) {
        self.faults.half_open.store(on, SeqCst);
        self.cut.send_modify(|_| {});
    }

    /// Resets (RST) each open connection halfway through the next packet
    /// it sends its client; connections made after that are left alone.
    pub fn reset_mid_packet(&self) {
        self.faults.reset_mid_packet.store(true, SeqCst);
    }

    /// Every fault off (what was swallowed or cut stays so).
    pub fn heal(&self) {
        let f = &self.faults;
        f.black_hole.store(false, SeqCst);
        f.latency_ms.store(0, SeqCst);
        f.bytes_per_s.store(0, SeqCst);
        f.drip_ms.store(0, SeqCst);
        f.half_open.store(false, SeqCst);
        f.reset_mid_packet.store(false, SeqCst);
    }

    /// Cuts every open connection now.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.faults.connections.load(SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.cut_all();
    }
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    faults: Arc<Faults>,
    mut cut: watch::Receiver<u64>,
) {
    let Ok(mut broker) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    faults.connections.fetch_add(1, SeqCst);
    let cut_at = faults.cut_at_subscribe.swap(0, SeqCst);
    cut.borrow_and_update();
    let (mut client_rd, client_wr) = client.split();
    let (mut broker_rd, broker_wr) = broker.split();
    let (up_tx, up_rx) = tokio::sync::mpsc::unbounded_channel();
    let (down_tx, down_rx) = tokio::sync::mpsc::unbounded_channel();
    let upward = async {
        let mut pending = Vec::new();
        let mut subscribes = 0;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = client_rd.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if faults.black_hole.load(SeqCst) {
                continue;
            }
            pending.extend_from_slice(&buf[..n]);
            // Forward whole packets only, so a cut falls between packets.
            while let Some(len) = packet_len(&pending) {
                if pending[0] >> 4 == SUBSCRIBE {
                    subscribes += 1;
                    if subscribes == cut_at {
                        return;
                    }
                }
                let due = due(&faults);
                if up_tx.send((due, pending[..len].to_vec())).is_err() {
                    return;
                }
                pending.drain(..len);
            }
        }
    };
    let downward = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = broker_rd.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if faults.black_hole.load(SeqCst) {
                continue;
            }
            if down_tx.send((due(&faults), buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    // A cut ends the connection; a change to `half_open` is not a cut.
    let cut_seen = cut.borrow_and_update().to_owned();
    let cuts = async {
        loop {
            if cut.changed().await.is_err() || *cut.borrow_and_update() != cut_seen {
                return;
            }
        }
    };
    let reset = tokio::select! {
        () = upward => false,
        () = downward => false,
        r = deliver(up_rx, broker_wr, &faults, false) => matches!(r, Delivered::Reset),
        r = deliver(down_rx, client_wr, &faults, true) => matches!(r, Delivered::Reset),
        () = cuts => false,
    };
    if reset {
        // SO_LINGER 0: closing sends RST, not FIN.
        let _ = client.set_zero_linger();
        let _ = broker.set_zero_linger();
    }
}

/// When bytes read now may go on.
fn due(faults: &Faults) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(faults.latency_ms.load(SeqCst))
}

/// Writes each chunk at its due time, in order, as the faults say; returns
/// when the writer fails or the connection is to be reset. `to_client`:
/// this is the broker-to-client direction.
async fn deliver(
    mut chunks: tokio::sync::mpsc::UnboundedReceiver<(tokio::time::Instant, Vec<u8>)>,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    faults: &Faults,
    to_client: bool,
) -> Delivered {
    let mut closed = false;
    loop {
        if to_client && !closed && faults.half_open.load(SeqCst) {
            // A FIN to the client; what the broker sends goes nowhere now.
            let _ = to.shutdown().await;
            closed = true;
        }
        let next = if to_client && !closed {
            // Wake for a half-open switched on while idle, too.
            match tokio::time::timeout(Duration::from_millis(20), chunks.recv()).await {
                Ok(next) => next,
                Err(_) => continue,
            }
        } else {
            chunks.recv().await
        };
        let Some((due, bytes)) = next else {
            std::future::pending::<()>().await;
            return Delivered::Ok;
        };
        if closed {
            continue;
        }
        tokio::time::sleep_until(due).await;
        let written = if to_client && bytes.len() >= 2 && faults.reset_mid_packet.load(SeqCst) {
            let _ = to.write_all(&bytes[..bytes.len() / 2]).await;
            let _ = to.flush().await;
            return Delivered::Reset;
        } else {
            write_paced(&mut to, &bytes, faults).await
        };
        if !written {
            return Delivered::Failed;
        }
    }
}

/// Writes `bytes` within the bandwidth limit, or one at a time when
/// dripping; whether it all went.
async fn write_paced(
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    bytes: &[u8],
    faults: &Faults,
) -> bool {
    let drip = faults.drip_ms.load(SeqCst);
    if drip > 0 {
        for b in bytes {
            if to.write_all(std::slice::from_ref(b)).await.is_err() || to.flush().await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(drip)).await;
        }
        return true;
    }
    if to.write_all(bytes).await.is_err() {
        return false;
    }
    let rate = faults.bytes_per_s.load(SeqCst);
    if rate > 0 {
        let secs = bytes.len() as f64 / rate as f64;
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }
    true
}

/// The length of the first whole MQTT packet in `buf`, if it is all there.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let len = 1 + i + 1 + remaining;
            return (buf.len() >= len).then_some(len);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::packet_len;

    #[test]
    fn packet_lengths() {
        assert_eq!(packet_len(&[0xc0, 0]), Some(2));
        assert_eq!(packet_len(&[0x82, 3, 0, 1, 2]), Some(5));
        assert_eq!(packet_len(&[0x82, 3, 0, 1]), None);
        assert_eq!(packet_len(&[0x30, 0x80]), None);
        let mut long = vec![0x30, 0x80, 0x01];
        long.extend(std::iter::repeat_n(0, 128));
        assert_eq!(packet_len(&long), Some(131));
    }
}
