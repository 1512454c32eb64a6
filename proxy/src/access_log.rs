//! Access logs: formatting on the worker, writing on a background thread.
//!
//! A worker formats the line and pushes it into a bounded queue; a writer
//! thread buffers lines per file and flushes every
//! `--file-flush-interval-msec` or once `--file-flush-min-size-kb` is
//! buffered. A full queue drops the line and counts it rather than block a
//! worker.
//!
//! The queue is std's list channel (blocks allocated as lines arrive, freed
//! as they are written) bounded by a counter of queued lines, not
//! `sync_channel`: that one allocates and initialises all its slots up
//! front, 2.5 MiB of resident memory for 65,536 slots whether or not any
//! access log is configured.
use std::{
    collections::HashMap,
    io::Write,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};

use xds_client::config::{AccessLog, AccessLogFilter, AccessLogSink, JsonFormatValue, LogFormat};

use crate::http::info::{render, StreamInfo};
use crate::stats::{Counter, StatName, Store};

enum Msg {
    Line(Arc<AccessLogSink>, String),
    Flush(mpsc::Sender<()>),
}

/// Lines queued for the writer at most; more are dropped (and counted).
const QUEUE_LINES: usize = 65_536;

/// The process-wide writer.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    /// Lines sent and not yet taken by the writer thread.
    queued: Arc<AtomicUsize>,
    dropped: Arc<Counter>,
}

impl Writer {
    pub fn start(flush_interval: Duration, min_flush_bytes: usize, stats: &Store) -> Writer {
        let (tx, rx) = mpsc::channel::<Msg>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        std::thread::Builder::new()
            .name("weir-access-log".into())
            .spawn(move || writer_loop(rx, &q, flush_interval, min_flush_bytes))
            .expect("spawn access log thread");
        Writer {
            tx,
            queued,
            dropped: stats.counter(StatName::plain("access_log.dropped_lines")),
        }
    }

    /// Queues a line unless `QUEUE_LINES` are already waiting.
    fn send_line(&self, sink: Arc<AccessLogSink>, line: String) -> bool {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE_LINES {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if self.tx.send(Msg::Line(sink, line)).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Waits until everything queued so far is written (shutdown, tests).
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

fn writer_loop(
    rx: mpsc::Receiver<Msg>,
    queued: &AtomicUsize,
    interval: Duration,
    min_bytes: usize,
) {
    let mut bufs: HashMap<PathBuf, (std::fs::File, Vec<u8>)> = HashMap::new();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let flush_all = |bufs: &mut HashMap<PathBuf, (std::fs::File, Vec<u8>)>,
                     stdout: &mut Vec<u8>,
                     stderr: &mut Vec<u8>| {
        for (f, b) in bufs.values_mut() {
            if !b.is_empty() {
                let _ = f.write_all(b);
                b.clear();
            }
        }
        if !stdout.is_empty() {
            let _ = std::io::stdout().write_all(stdout);
            let _ = std::io::stdout().flush();
            stdout.clear();
        }
        if !stderr.is_empty() {
            let _ = std::io::stderr().write_all(stderr);
            stderr.clear();
        }
    };
    loop {
        match rx.recv_timeout(interval) {
            Ok(Msg::Line(sink, line)) => {
                queued.fetch_sub(1, Ordering::Relaxed);
                let buf = match &*sink {
                    AccessLogSink::Stdout => &mut stdout,
                    AccessLogSink::Stderr => &mut stderr,
                    AccessLogSink::File(p) => {
                        if !bufs.contains_key(p) {
                            match std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(p)
                            {
                                Ok(f) => {
                                    bufs.insert(p.clone(), (f, Vec::new()));
                                }
                                Err(e) => {
                                    tracing::warn!(path = %p.display(), error = %e, "cannot open access log");
                                    continue;
                                }
                            }
                        }
                        &mut bufs.get_mut(p).expect("inserted").1
                    }
                };
                buf.extend_from_slice(line.as_bytes());
                if buf.len() >= min_bytes {
                    flush_all(&mut bufs, &mut stdout, &mut stderr);
                }
            }
            Ok(Msg::Flush(done)) => {
                flush_all(&mut bufs, &mut stdout, &mut stderr);
                let _ = done.send(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => flush_all(&mut bufs, &mut stdout, &mut stderr),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                flush_all(&mut bufs, &mut stdout, &mut stderr);
                return;
            }
        }
    }
}

/// One configured access log.
pub struct Logger {
    config: Arc<AccessLog>,
    sink: Arc<AccessLogSink>,
    writer: Writer,
}

impl Logger {
    pub fn new(config: Arc<AccessLog>, writer: Writer) -> Self {
        Logger {
            sink: Arc::new(config.sink.clone()),
            config,
            writer,
        }
    }

    /// Formats and queues one line if the filter passes.
    pub fn log(&self, info: &StreamInfo) {
        if let Some(f) = &self.config.filter {
            if !filter_passes(f, info) {
                return;
            }
        }
        let line = format_line(&self.config.format, info);
        if !self.writer.send_line(self.sink.clone(), line) {
            self.writer.dropped.inc();
        }
    }
}

/// Renders a line as Envoy: text formats as given (with a trailing newline
/// for the default format), JSON as one object per line.
pub fn format_line(f: &LogFormat, info: &StreamInfo) -> String {
    match f {
        LogFormat::Text(t) => render(t, info, None, None, "-"),
        LogFormat::Json(fields) => {
            let mut v = json_obj(fields, info).to_string();
            v.push('\n');
            v
        }
    }
}

fn json_obj(fields: &[(String, JsonFormatValue)], info: &StreamInfo) -> serde_json::Value {
    use xds_client::config::FormatPart;
    let mut m = serde_json::Map::new();
    for (k, v) in fields {
        let jv = match v {
            JsonFormatValue::Format(f) => {
                // A lone operator keeps its type; a missing value is null.
                if let [FormatPart::Op(op)] = f.parts.as_slice() {
                    match crate::http::info::eval(&op.cmd, info, None, None) {
                        None => serde_json::Value::Null,
                        Some(s) => match op.cmd {
                            xds_client::config::Command::ResponseCode
                            | xds_client::config::Command::BytesReceived
                            | xds_client::config::Command::BytesSent
                            | xds_client::config::Command::Duration
                            | xds_client::config::Command::UpstreamRequestAttemptCount => s
                                .parse::<u64>()
                                .map(serde_json::Value::from)
                                .unwrap_or(serde_json::Value::String(s)),
                            _ => serde_json::Value::String(s),
                        },
                    }
                } else {
                    serde_json::Value::String(render(f, info, None, None, "-"))
                }
            }
            JsonFormatValue::Nested(n) => json_obj(n, info),
            JsonFormatValue::Number(n) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            JsonFormatValue::Bool(b) => serde_json::Value::Bool(*b),
        };
        m.insert(k.clone(), jv);
    }
    serde_json::Value::Object(m)
}

fn filter_passes(f: &AccessLogFilter, info: &StreamInfo) -> bool {
    match f {
        AccessLogFilter::Status(c) => c.eval(u64::from(info.response_code)),
        AccessLogFilter::Duration(c) => {
            c.eval(info.duration.map(|d| d.as_millis() as u64).unwrap_or(0))
        }
        AccessLogFilter::ResponseFlag(flags) => info.flags.has_any(flags),
        AccessLogFilter::NotHealthCheck => true,
        AccessLogFilter::And(v) => v.iter().all(|f| filter_passes(f, info)),
        AccessLogFilter::Or(v) => v.iter().any(|f| filter_passes(f, info)),
        AccessLogFilter::Header(m) => {
            let v = info.request_headers.as_ref().and_then(|h| match &m.name {
                xds_client::config::HeaderKey::Name(n) => xds_client::config::header_value(h, n),
                _ => None,
            });
            m.matches(v.as_deref())
        }
    }
}
