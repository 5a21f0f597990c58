//! Micro-benchmarks of the sans-IO core: topic build/parse, payload
//! encode/decode, and the pending table; and the web console's work per
//! call in the gateway.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use directcall_core::{
    CallTopics, MessageId, Method, PendingTable, Prefix, ReplyPayload, RequestPayload, Target,
};
use serde_json::json;

fn call() -> CallTopics {
    CallTopics::new(
        Target::new("Device001").unwrap(),
        Method::new("reqid-ABCD").unwrap(),
        Prefix::default(),
        MessageId::new(),
    )
    .unwrap()
}

fn topics(c: &mut Criterion) {
    let mut g = c.benchmark_group("topic");
    g.throughput(Throughput::Elements(1));
    let call = call();
    let reply = call.reply_topic();
    g.bench_function("validate+build request", |b| {
        b.iter(|| {
            let c = CallTopics::new(
                Target::new(black_box("Device001")).unwrap(),
                Method::new(black_box("reqid-ABCD")).unwrap(),
                Prefix::default(),
                MessageId::new(),
            )
            .unwrap();
            black_box(c.request_topic())
        })
    });
    g.bench_function("parse reply", |b| {
        b.iter(|| black_box(CallTopics::parse_reply(black_box(&reply)).unwrap()))
    });
    g.finish();
}

fn payloads(c: &mut Criterion) {
    let mut g = c.benchmark_group("payload");
    g.throughput(Throughput::Elements(1));
    let mut request = RequestPayload::new(MessageId::new().to_string(), json!("my_request_1"));
    request.timestamp = Some(1_764_300_000_000);
    request.timeout_ms = Some(3000);
    let reply = ReplyPayload::new(
        MessageId::new().to_string(),
        200,
        json!("Your request was 'my_request_1'. Some random response: '333.0155808661127'"),
    )
    .to_vec();
    g.bench_function("encode request", |b| b.iter(|| black_box(request.to_vec())));
    g.bench_function("decode reply", |b| {
        b.iter(|| black_box(ReplyPayload::from_slice(black_box(&reply)).unwrap()))
    });
    g.finish();
}

fn pending(c: &mut Criterion) {
    let mut g = c.benchmark_group("pending");
    g.throughput(Throughput::Elements(1));
    let table = PendingTable::<u64>::default();
    let deadline = || std::time::Instant::now() + std::time::Duration::from_secs(60);
    // 100k calls already waiting: insert + complete + collect one more.
    let _held: Vec<_> = (0..100_000)
        .map(|_| table.insert(&call(), deadline()).0)
        .collect();
    let calls: Vec<_> = (0..1024).map(|_| call()).collect();
    let mut i = 0;
    g.bench_function("insert+complete at 100k pending", |b| {
        b.iter(|| {
            let c = &calls[i % calls.len()];
            i += 1;
            let (pending, _) = table.insert(c, deadline());
            table.complete(c, 1).unwrap();
            black_box(futures_util::FutureExt::now_or_never(pending));
        })
    });
    g.finish();
}

fn pending_contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("pending");
    g.throughput(Throughput::Elements(1));
    let table = PendingTable::<u64>::default();
    // 4 threads inserting and completing at once on one table (a requester
    // with calls from many tasks and the reply path competing for its lock).
    g.bench_function("insert+complete, 4 threads contending", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(4);
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..4 {
                    let table = &table;
                    s.spawn(move || {
                        let calls: Vec<_> = (0..64).map(|_| call()).collect();
                        let deadline =
                            std::time::Instant::now() + std::time::Duration::from_secs(60);
                        for i in 0..per_thread {
                            let c = &calls[i as usize % calls.len()];
                            let (pending, _) = table.insert(c, deadline);
                            table.complete(c, i).unwrap();
                            black_box(futures_util::FutureExt::now_or_never(pending));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

/// What the gateway does per call for the console: a live-log entry and
/// the per-second tally; with a page open, the entry's JSON too.
fn console(c: &mut Criterion) {
    use directcall_cloud::gateway::{Console, LogEntry, Outcome};
    use std::time::Duration;
    let mut g = c.benchmark_group("console");
    g.throughput(Throughput::Elements(1));
    let console = Console::new();
    let entry = || {
        let mut e = LogEntry::new(
            "Device001",
            "windows_down",
            "ok",
            200,
            Duration::from_micros(350),
        );
        e.id = Some(MessageId::new().to_string());
        e.device_status = Some(200);
        e
    };
    g.bench_function("log+count, no page open", |b| {
        b.iter(|| {
            console.log(black_box(entry()));
            console.count(Outcome::Ok, Some(Duration::from_micros(350)));
        });
    });
    g.bench_function("log+count+JSON, a page open", |b| {
        b.iter(|| {
            console.log(black_box(entry()));
            console.count(Outcome::Ok, Some(Duration::from_micros(350)));
            black_box(console.newest_json());
        });
    });
    g.finish();
}

criterion_group!(
    benches,
    topics,
    payloads,
    pending,
    pending_contended,
    console
);
criterion_main!(benches);
