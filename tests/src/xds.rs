//! An in-process xDS control plane for integration tests: one tonic ADS
//! server (`AggregatedDiscoveryService`) that speaks both state-of-the-world
//! (`StreamAggregatedResources`) and incremental (`DeltaAggregatedResources`)
//! from one resource store, as ztunnel's `AdsServer` and go-control-plane do.
//!
//! The test scripts the store ([`ControlPlane::set`], [`ControlPlane::upsert`],
//! [`ControlPlane::remove`], or their `_yaml` forms that take resources
//! written like Envoy's docs) and every change is pushed at once to every
//! connected stream subscribed to that type:
//!
//! - **SotW**: Listener and Cluster are wildcard types (an empty
//!   `resource_names`, or `*`) and get the full set; other types get only the
//!   names the client asked for (a removed RouteConfiguration or
//!   ClusterLoadAssignment is simply absent from the next response). Wildcard
//!   types are answered even when empty, since Envoy waits for the first
//!   LDS/CDS response before it goes LIVE. ACKs and NACKs are not answered,
//!   and a request carrying a stale nonce does not trigger a response
//!   (go-control-plane).
//! - **Delta**: changed resources with their own version and
//!   `removed_resources` for removals; wildcard (first request with no names
//!   for Listener/Cluster, or `*`) gets everything, else only subscribed
//!   names. `initial_resource_versions` of a new stream is honoured: a
//!   resource whose version the client already has is not resent, one it
//!   has that is gone is reported removed. The first request of a wildcard
//!   type is always answered, if need be with an empty response.
//!
//! Versions: the store keeps one global counter, bumped by every change; a
//! resource's version is the counter value when its content last changed
//! (re-setting identical bytes keeps it), and every response carries the
//! counter at send time (`version_info` / `system_version_info`). Versions
//! are decimal strings, so "version `V` or later" is well defined and is
//! what [`ControlPlane::wait_for_ack`] waits for.
//!
//! Every request is recorded in order ([`ControlPlane::requests`]), every
//! response too ([`ControlPlane::sent`]); a request whose `response_nonce`
//! names a response of this server is an ACK ([`Ack`]) or, with
//! `error_detail`, a NACK ([`Nack`]).
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream, UnixListenerStream};
use xds_client::api::envoy::config::core::v3::Node;
use xds_client::api::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds_client::api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use xds_client::api::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use xds_client::api::google::protobuf::Any;
use xds_client::api::google::rpc::Status as RpcStatus;

/// How many requests, responses, ACKs and NACKs are kept (oldest dropped).
const MAX_RECORDS: usize = 10_000;

/// The xDS type URLs of the resources Envoy fetches over ADS.
pub mod type_url {
    /// LDS.
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// CDS.
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// RDS.
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// EDS.
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// SDS.
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    /// WDS (istio/proxy's workload discovery): named by `uid`.
    pub const WORKLOAD: &str = "type.googleapis.com/istio.workload.Workload";
}

/// One request received on an ADS stream, as decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// State of the world (`StreamAggregatedResources`).
    Sotw(DiscoveryRequest),
    /// Incremental (`DeltaAggregatedResources`).
    Delta(DeltaDiscoveryRequest),
}

/// One response the control plane sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The stream it went to (see [`ControlPlane::requests`]).
    pub stream: u64,
    /// Whether it was a `DeltaDiscoveryResponse`.
    pub delta: bool,
    pub type_url: String,
    /// `version_info` (SotW) or `system_version_info` (delta): the store's
    /// global version at send time.
    pub version: String,
    pub nonce: String,
    /// `(name, resource version)` of every resource carried.
    pub resources: Vec<(String, String)>,
    /// Delta `removed_resources` (always empty for SotW).
    pub removed: Vec<String>,
}

/// A request that acknowledged one of our responses (matching
/// `response_nonce`, no `error_detail`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub stream: u64,
    pub type_url: String,
    /// The version of the acknowledged response ([`Sent::version`]).
    pub version: String,
    pub nonce: String,
}

/// A request that rejected one of our responses (matching `response_nonce`
/// with `error_detail`).
#[derive(Debug, Clone, PartialEq)]
pub struct Nack {
    pub stream: u64,
    pub type_url: String,
    /// The version of the rejected response ([`Sent::version`]).
    pub version: String,
    pub nonce: String,
    /// For SotW, the `version_info` the client still runs (its last ACK).
    pub client_version: String,
    /// The client's `error_detail`; Envoy puts its rejection reason in
    /// `message`.
    pub error: RpcStatus,
}

/// A running ADS server; stops (ending every stream) when dropped.
pub struct ControlPlane {
    shared: Arc<Shared>,
    addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    shutdown: Option<oneshot::Sender<()>>,
    /// The SDS server of [`ControlPlane::serve_sds_unix`]: its socket file
    /// and shutdown.
    sds: Option<(PathBuf, oneshot::Sender<()>)>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every state change; waiters re-check on it.
    events: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    version: u64,
    /// type URL -> name -> entry.
    store: BTreeMap<String, BTreeMap<String, Entry>>,
    streams: BTreeMap<u64, Stream>,
    streams_opened: u64,
    streams_refused: u64,
    next_nonce: u64,
    paused: bool,
    requests: VecDeque<(u64, Recorded)>,
    sent: VecDeque<Sent>,
    acks: VecDeque<Ack>,
    nacks: VecDeque<Nack>,
}

#[derive(Clone)]
struct Entry {
    any: Any,
    version: u64,
}

struct Stream {
    tx: Tx,
    reader: Option<AbortHandle>,
    subs: BTreeMap<String, Sub>,
}

enum Tx {
    Sotw(mpsc::UnboundedSender<Result<DiscoveryResponse, tonic::Status>>),
    Delta(mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, tonic::Status>>),
}

/// A stream's subscription to one type.
#[derive(Default)]
struct Sub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// SotW: `(name, version)` of the last response; `None` before the first.
    last_sent: Option<BTreeMap<String, u64>>,
    /// SotW: the nonce of the last response.
    last_nonce: String,
    /// Delta: name -> version the client has (from `initial_resource_versions`
    /// and what was sent since).
    known: BTreeMap<String, String>,
}

#[derive(Clone)]
struct Ads {
    shared: Arc<Shared>,
}

// === impl Recorded ===

impl Recorded {
    /// The request's `type_url`.
    pub fn type_url(&self) -> &str {
        match self {
            Recorded::Sotw(r) => &r.type_url,
            Recorded::Delta(r) => &r.type_url,
        }
    }

    /// The `node`, when the request carries it.
    pub fn node(&self) -> Option<&Node> {
        match self {
            Recorded::Sotw(r) => r.node.as_ref(),
            Recorded::Delta(r) => r.node.as_ref(),
        }
    }

    /// The `response_nonce` (empty on a first request of a type).
    pub fn response_nonce(&self) -> &str {
        match self {
            Recorded::Sotw(r) => &r.response_nonce,
            Recorded::Delta(r) => &r.response_nonce,
        }
    }

    /// The `error_detail` of a NACK.
    pub fn error_detail(&self) -> Option<&RpcStatus> {
        match self {
            Recorded::Sotw(r) => r.error_detail.as_ref(),
            Recorded::Delta(r) => r.error_detail.as_ref(),
        }
    }

    /// The delta request, if it is one.
    pub fn as_delta(&self) -> Option<&DeltaDiscoveryRequest> {
        match self {
            Recorded::Delta(r) => Some(r),
            Recorded::Sotw(_) => None,
        }
    }

    /// The SotW request, if it is one.
    pub fn as_sotw(&self) -> Option<&DiscoveryRequest> {
        match self {
            Recorded::Sotw(r) => Some(r),
            Recorded::Delta(_) => None,
        }
    }

    /// One line for failure messages.
    fn summary(&self) -> String {
        let err = self
            .error_detail()
            .map(|e| format!(" error={:?}", e.message))
            .unwrap_or_default();
        match self {
            Recorded::Sotw(r) => format!(
                "sotw {} version={:?} nonce={:?} names={:?}{err}",
                short_type(&r.type_url),
                r.version_info,
                r.response_nonce,
                r.resource_names
            ),
            Recorded::Delta(r) => format!(
                "delta {} nonce={:?} subscribe={:?} unsubscribe={:?} initial={:?}{err}",
                short_type(&r.type_url),
                r.response_nonce,
                r.resource_names_subscribe,
                r.resource_names_unsubscribe,
                r.initial_resource_versions
            ),
        }
    }
}

// === impl ControlPlane ===

impl ControlPlane {
    /// Starts an ADS server (HTTP/2 cleartext gRPC) on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<ControlPlane> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = TcpListenerStream::new(listener);
        let mut cp = ControlPlane::serve(incoming);
        cp.addr = Some(addr);
        Ok(cp)
    }

    /// Starts an ADS server on a Unix socket at `path` (as Istio's
    /// pilot-agent serves Envoy). The socket file must not exist; it is
    /// removed on drop.
    pub async fn start_unix(path: impl AsRef<Path>) -> std::io::Result<ControlPlane> {
        let path = path.as_ref().to_path_buf();
        let listener = tokio::net::UnixListener::bind(&path)?;
        let incoming = UnixListenerStream::new(listener);
        let mut cp = ControlPlane::serve(incoming);
        cp.unix_path = Some(path);
        Ok(cp)
    }

    fn serve<S, IO, E>(incoming: S) -> ControlPlane
    where
        S: tokio_stream::Stream<Item = Result<IO, E>> + Send + 'static,
        IO: tonic::transport::server::Connected
            + tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + Unpin
            + Send
            + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (events, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            events,
        });
        let (shutdown, stop) = oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(Ads {
            shared: shared.clone(),
        });
        tokio::spawn(async move {
            // Errors here mean the listener failed; the test sees it as
            // streams that never connect.
            // One service, so no router (tonic's `router` feature pulls in axum).
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(svc, incoming, async {
                    let _ = stop.await;
                })
                .await;
        });
        ControlPlane {
            shared,
            addr: None,
            unix_path: None,
            shutdown: Some(shutdown),
            sds: None,
        }
    }

    /// Also serves the secret discovery service (`StreamSecrets`, state of
    /// the world, and `DeltaSecrets`) on a Unix socket at `path`, from the
    /// same resources, as Istio's pilot-agent serves the `sds-grpc`
    /// cluster on its UDS. Requests, ACKs and NACKs are recorded with the
    /// ADS ones.
    pub async fn serve_sds_unix(&mut self, path: impl AsRef<Path>) -> std::io::Result<()> {
        let path = path.as_ref().to_path_buf();
        let listener = tokio::net::UnixListener::bind(&path)?;
        let incoming = UnixListenerStream::new(listener);
        let (shutdown, stop) = oneshot::channel::<()>();
        let svc = SecretDiscoveryServiceServer::new(Sds {
            shared: self.shared.clone(),
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(svc, incoming, async {
                    let _ = stop.await;
                })
                .await;
        });
        self.sds = Some((path, shutdown));
        Ok(())
    }

    /// The TCP address (`None` for a Unix-socket server).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The Unix socket path (`None` for a TCP server).
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// The store's current global version.
    pub fn version(&self) -> String {
        self.shared.lock().version.to_string()
    }

    /// The version of one stored resource, if present.
    pub fn resource_version(&self, type_url: &str, name: &str) -> Option<String> {
        let st = self.shared.lock();
        st.store
            .get(type_url)
            .and_then(|m| m.get(name))
            .map(|e| e.version.to_string())
    }

    /// Replaces every resource of `type_url` with `resources` (names read
    /// from the resources, see [`resource_name`]) and pushes the change.
    /// Returns the new global version.
    pub fn set(&self, type_url: &str, resources: Vec<Any>) -> anyhow::Result<String> {
        let mut named = BTreeMap::new();
        for any in resources {
            check_type(type_url, &any)?;
            let name = resource_name(&any)?;
            if named.insert(name.clone(), any).is_some() {
                bail!("two {} resources named {name:?}", short_type(type_url));
            }
        }
        Ok(self.shared.change(type_url, |version, map| {
            let old = std::mem::take(map);
            for (name, any) in named {
                let version = match old.get(&name) {
                    Some(e) if e.any == any => e.version,
                    _ => version,
                };
                map.insert(name, Entry { any, version });
            }
        }))
    }

    /// Adds or replaces one resource of `type_url`, named by its own `name`
    /// (`cluster_name` for a ClusterLoadAssignment; see [`resource_name`]),
    /// and pushes the change. Returns the new global version. Identical bytes
    /// keep the resource's version (nothing is resent).
    pub fn upsert(&self, type_url: &str, resource: Any) -> anyhow::Result<String> {
        check_type(type_url, &resource)?;
        let name = resource_name(&resource)?;
        Ok(self.shared.change(type_url, |version, map| {
            if map.get(&name).is_some_and(|e| e.any == resource) {
                return;
            }
            map.insert(
                name,
                Entry {
                    any: resource,
                    version,
                },
            );
        }))
    }

    /// Removes one resource (a no-op when absent) and pushes the change.
    /// Returns the new global version.
    pub fn remove(&self, type_url: &str, name: &str) -> String {
        self.shared.change(type_url, |_, map| {
            map.remove(name);
        })
    }

    /// [`ControlPlane::set`] with resources written as YAML or JSON (Envoy's
    /// JSON mapping, as in Envoy's docs).
    pub fn set_yaml(&self, type_url: &str, resources: &[&str]) -> anyhow::Result<String> {
        let anys = resources
            .iter()
            .map(|text| any_from_yaml(type_url, text))
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.set(type_url, anys)
    }

    /// [`ControlPlane::upsert`] with the resource written as YAML or JSON.
    pub fn upsert_yaml(&self, type_url: &str, resource: &str) -> anyhow::Result<String> {
        self.upsert(type_url, any_from_yaml(type_url, resource)?)
    }

    /// When `true`, new streams are refused with gRPC `UNAVAILABLE`
    /// (existing streams are untouched; see [`ControlPlane::disconnect_all`]).
    pub fn pause(&self, paused: bool) {
        self.shared.lock().paused = paused;
    }

    /// Ends every open stream with gRPC `UNAVAILABLE`, so clients must
    /// reconnect. Their subscriptions are forgotten; the store is kept.
    pub fn disconnect_all(&self) {
        let mut st = self.shared.lock();
        for (_, stream) in std::mem::take(&mut st.streams) {
            stream.tx.fail(tonic::Status::unavailable(
                "stream closed by the test control plane",
            ));
        }
        drop(st);
        self.shared.notify();
    }

    /// How many streams are open now.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// How many streams were ever accepted (refused ones excluded).
    pub fn streams_opened(&self) -> u64 {
        self.shared.lock().streams_opened
    }

    /// How many streams were refused because of [`ControlPlane::pause`].
    pub fn streams_refused(&self) -> u64 {
        self.shared.lock().streams_refused
    }

    /// Every request received, in order, with its stream id (ids count from
    /// 1 in accept order). The most recent 10 000 are kept.
    pub fn requests(&self) -> Vec<(u64, Recorded)> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Every response sent, in order.
    pub fn sent(&self) -> Vec<Sent> {
        self.shared.lock().sent.iter().cloned().collect()
    }

    /// Every ACK received, in order.
    pub fn acks(&self) -> Vec<Ack> {
        self.shared.lock().acks.iter().cloned().collect()
    }

    /// Every NACK received, in order.
    pub fn nacks(&self) -> Vec<Nack> {
        self.shared.lock().nacks.iter().cloned().collect()
    }

    /// Waits until some stream ACKs a response of `type_url` at `version` or
    /// later (a response carries the global version at send time, so an
    /// ACK of a later response covers every change up to `version`). For
    /// delta the ACK is the request whose `response_nonce` is that
    /// response's nonce ([`Sent::nonce`]) without `error_detail`.
    pub async fn wait_for_ack(
        &self,
        type_url: &str,
        version: &str,
        timeout: Duration,
    ) -> anyhow::Result<Ack> {
        let min = parse_version(version)?;
        self.wait(
            timeout,
            || format!("an ACK of {} at version >= {min}", short_type(type_url)),
            |st| {
                st.acks
                    .iter()
                    .find(|a| a.type_url == type_url && version_at_least(&a.version, min))
                    .cloned()
            },
        )
        .await
    }

    /// Waits until some stream NACKs a response of `type_url` at `version`
    /// or later; returns the NACK (its `error.message` is the client's
    /// reason).
    pub async fn wait_for_nack(
        &self,
        type_url: &str,
        version: &str,
        timeout: Duration,
    ) -> anyhow::Result<Nack> {
        let min = parse_version(version)?;
        self.wait(
            timeout,
            || format!("a NACK of {} at version >= {min}", short_type(type_url)),
            |st| {
                st.nacks
                    .iter()
                    .find(|n| n.type_url == type_url && version_at_least(&n.version, min))
                    .cloned()
            },
        )
        .await
    }

    /// Waits until an open stream is subscribed to `name` of `type_url`
    /// (`"*"`: a wildcard subscription). Returns the stream id.
    pub async fn wait_for_subscription(
        &self,
        type_url: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        self.wait(
            timeout,
            || format!("a subscription to {} {name:?}", short_type(type_url)),
            |st| {
                st.streams.iter().find_map(|(id, s)| {
                    let sub = s.subs.get(type_url)?;
                    let hit = if name == "*" {
                        sub.wildcard
                    } else {
                        sub.names.contains(name)
                    };
                    hit.then_some(*id)
                })
            },
        )
        .await
    }

    /// Waits until a request for which `pred(stream, request)` holds has
    /// been received (including ones received before the call); returns the
    /// first such.
    pub async fn wait_for_request(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(u64, &Recorded) -> bool,
    ) -> anyhow::Result<(u64, Recorded)> {
        self.wait(
            timeout,
            || format!("a request: {what}"),
            |st| st.requests.iter().find(|(id, r)| pred(*id, r)).cloned(),
        )
        .await
    }

    /// Waits until exactly `n` streams are open.
    pub async fn wait_for_streams(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait(
            timeout,
            || format!("{n} open streams"),
            |st| (st.streams.len() == n).then_some(()),
        )
        .await
    }

    /// Re-checks `check` after every event until it returns `Some` or
    /// `timeout` passes; the error names `what` and the recent requests.
    async fn wait<T>(
        &self,
        timeout: Duration,
        what: impl FnOnce() -> String,
        mut check: impl FnMut(&State) -> Option<T>,
    ) -> anyhow::Result<T> {
        let mut events = self.shared.events.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            events.borrow_and_update();
            if let Some(v) = check(&self.shared.lock()) {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, events.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("control plane stopped while waiting for {}", what()),
                Err(_) => {
                    let st = self.shared.lock();
                    bail!(
                        "timed out after {timeout:?} waiting for {}; {} streams open; last requests:\n{}",
                        what(),
                        st.streams.len(),
                        st.recent_requests(12)
                    )
                }
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        for (_, stream) in std::mem::take(&mut st.streams) {
            if let Some(reader) = &stream.reader {
                reader.abort();
            }
            stream
                .tx
                .fail(tonic::Status::unavailable("test control plane stopped"));
        }
        drop(st);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
        if let Some((path, tx)) = self.sds.take() {
            let _ = tx.send(());
            let _ = std::fs::remove_file(path);
        }
    }
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge the server.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Bumps the version, lets `edit` change the type's map (given the new
    /// version for changed entries), pushes to subscribers.
    fn change(
        &self,
        type_url: &str,
        edit: impl FnOnce(u64, &mut BTreeMap<String, Entry>),
    ) -> String {
        let mut st = self.lock();
        st.version += 1;
        let version = st.version;
        edit(version, st.store.entry(type_url.to_owned()).or_default());
        let ids: Vec<u64> = st
            .streams
            .iter()
            .filter(|(_, s)| s.subs.contains_key(type_url))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            st.push(id, type_url, false);
        }
        drop(st);
        self.notify();
        version.to_string()
    }

    /// Registers a stream and spawns its reader; `None` when paused.
    fn open<Req: Send + 'static>(
        self: &Arc<Self>,
        tx: Tx,
        mut inbound: tonic::Streaming<Req>,
        on_request: fn(&Shared, u64, Req),
    ) -> Option<u64> {
        let mut st = self.lock();
        if st.paused {
            st.streams_refused += 1;
            drop(st);
            self.notify();
            return None;
        }
        st.streams_opened += 1;
        let id = st.streams_opened;
        let shared = self.clone();
        // The reader starts by locking the state, so it runs after the
        // stream is registered below.
        let reader = tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                on_request(&shared, id, req);
            }
            shared.close(id);
        });
        st.streams.insert(
            id,
            Stream {
                tx,
                reader: Some(reader.abort_handle()),
                subs: BTreeMap::new(),
            },
        );
        drop(st);
        self.notify();
        Some(id)
    }

    fn close(&self, id: u64) {
        let removed = self.lock().streams.remove(&id).is_some();
        if removed {
            self.notify();
        }
    }

    fn on_sotw(&self, id: u64, req: DiscoveryRequest) {
        let mut st = self.lock();
        st.record(id, Recorded::Sotw(req.clone()));
        let t = req.type_url.clone();
        if !req.response_nonce.is_empty() {
            st.ack_or_nack(
                id,
                &t,
                &req.response_nonce,
                &req.version_info,
                req.error_detail.clone(),
            );
        }
        if let Some(stream) = st.streams.get_mut(&id) {
            let sub = stream.subs.entry(t.clone()).or_default();
            sub.wildcard = is_wildcard_type(&t)
                && (req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*"));
            sub.names = req
                .resource_names
                .iter()
                .filter(|n| *n != "*")
                .cloned()
                .collect();
            // A stale nonce means a response is in flight; the client will
            // ask again after it (go-control-plane ignores such requests).
            let current = req.response_nonce.is_empty() || req.response_nonce == sub.last_nonce;
            if current {
                st.push(id, &t, false);
            }
        }
        drop(st);
        self.notify();
    }

    fn on_delta(&self, id: u64, req: DeltaDiscoveryRequest) {
        let mut st = self.lock();
        st.record(id, Recorded::Delta(req.clone()));
        let t = req.type_url.clone();
        if !req.response_nonce.is_empty() {
            st.ack_or_nack(id, &t, &req.response_nonce, "", req.error_detail.clone());
        }
        if let Some(stream) = st.streams.get_mut(&id) {
            let first = !stream.subs.contains_key(&t);
            let sub = stream.subs.entry(t.clone()).or_default();
            if first {
                // Legacy wildcard: the first request of LDS/CDS names nothing.
                sub.wildcard = is_wildcard_type(&t) && req.resource_names_subscribe.is_empty();
                sub.known = req
                    .initial_resource_versions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
            }
            for name in &req.resource_names_subscribe {
                if name == "*" {
                    sub.wildcard = true;
                } else {
                    sub.names.insert(name.clone());
                }
            }
            for name in &req.resource_names_unsubscribe {
                if name == "*" {
                    sub.wildcard = false;
                } else {
                    sub.names.remove(name);
                    if !sub.wildcard {
                        sub.known.remove(name);
                    }
                }
            }
            st.push(id, &t, first);
        }
        drop(st);
        self.notify();
    }
}

// === impl State ===

impl State {
    fn record(&mut self, stream: u64, req: Recorded) {
        push_bounded(&mut self.requests, (stream, req));
    }

    fn ack_or_nack(
        &mut self,
        stream: u64,
        type_url: &str,
        nonce: &str,
        client_version: &str,
        error: Option<RpcStatus>,
    ) {
        let Some(sent) = self
            .sent
            .iter()
            .rev()
            .find(|s| s.stream == stream && s.nonce == nonce && s.type_url == type_url)
        else {
            return;
        };
        let (version, nonce) = (sent.version.clone(), sent.nonce.clone());
        match error {
            Some(error) => push_bounded(
                &mut self.nacks,
                Nack {
                    stream,
                    type_url: type_url.to_owned(),
                    version,
                    nonce,
                    client_version: client_version.to_owned(),
                    error,
                },
            ),
            None => push_bounded(
                &mut self.acks,
                Ack {
                    stream,
                    type_url: type_url.to_owned(),
                    version,
                    nonce,
                },
            ),
        }
    }

    /// Sends stream `id` what it lacks of `type_url`, if anything.
    /// `first`: the stream's first delta request for the type.
    fn push(&mut self, id: u64, type_url: &str, first: bool) {
        let State {
            version,
            store,
            streams,
            sent,
            next_nonce,
            ..
        } = self;
        let Some(stream) = streams.get_mut(&id) else {
            return;
        };
        let Some(sub) = stream.subs.get_mut(type_url) else {
            return;
        };
        let empty = BTreeMap::new();
        let entries = store.get(type_url).unwrap_or(&empty);
        let wanted = |name: &str| sub.wildcard || sub.names.contains(name);
        let record = match &stream.tx {
            Tx::Sotw(tx) => {
                let content: BTreeMap<String, u64> = entries
                    .iter()
                    .filter(|(n, _)| wanted(n))
                    .map(|(n, e)| (n.clone(), e.version))
                    .collect();
                if sub.last_sent.as_ref() == Some(&content)
                    || (sub.last_sent.is_none() && content.is_empty() && !sub.wildcard)
                {
                    return;
                }
                let nonce = new_nonce(next_nonce);
                let resp = DiscoveryResponse {
                    version_info: version.to_string(),
                    resources: content
                        .keys()
                        .filter_map(|n| entries.get(n))
                        .map(|e| e.any.clone())
                        .collect(),
                    type_url: type_url.to_owned(),
                    nonce: nonce.clone(),
                    ..Default::default()
                };
                let _ = tx.send(Ok(resp));
                let resources = content
                    .iter()
                    .map(|(n, v)| (n.clone(), v.to_string()))
                    .collect();
                sub.last_sent = Some(content);
                sub.last_nonce = nonce.clone();
                Sent {
                    stream: id,
                    delta: false,
                    type_url: type_url.to_owned(),
                    version: version.to_string(),
                    nonce,
                    resources,
                    removed: Vec::new(),
                }
            }
            Tx::Delta(tx) => {
                let changed: Vec<(&String, &Entry)> = entries
                    .iter()
                    .filter(|(n, e)| wanted(n) && sub.known.get(*n) != Some(&e.version.to_string()))
                    .collect();
                let removed: Vec<String> = sub
                    .known
                    .keys()
                    .filter(|n| !entries.contains_key(*n))
                    .cloned()
                    .collect();
                if changed.is_empty() && removed.is_empty() && !(first && sub.wildcard) {
                    return;
                }
                let nonce = new_nonce(next_nonce);
                let resp = DeltaDiscoveryResponse {
                    system_version_info: version.to_string(),
                    resources: changed
                        .iter()
                        .map(|(n, e)| Resource {
                            name: (*n).clone(),
                            version: e.version.to_string(),
                            resource: Some(e.any.clone()),
                            ..Default::default()
                        })
                        .collect(),
                    type_url: type_url.to_owned(),
                    removed_resources: removed.clone(),
                    nonce: nonce.clone(),
                    ..Default::default()
                };
                let _ = tx.send(Ok(resp));
                let resources: Vec<(String, String)> = changed
                    .iter()
                    .map(|(n, e)| ((*n).clone(), e.version.to_string()))
                    .collect();
                for (n, v) in &resources {
                    sub.known.insert(n.clone(), v.clone());
                }
                for n in &removed {
                    sub.known.remove(n);
                }
                Sent {
                    stream: id,
                    delta: true,
                    type_url: type_url.to_owned(),
                    version: version.to_string(),
                    nonce,
                    resources,
                    removed,
                }
            }
        };
        push_bounded(sent, record);
    }

    fn recent_requests(&self, n: usize) -> String {
        let skip = self.requests.len().saturating_sub(n);
        let lines: Vec<String> = self
            .requests
            .iter()
            .skip(skip)
            .map(|(id, r)| format!("  stream {id}: {}", r.summary()))
            .collect();
        if lines.is_empty() {
            "  (none)".to_owned()
        } else {
            lines.join("\n")
        }
    }
}

// === impl Tx ===

impl Tx {
    /// Ends the response stream with `status` (dropping `self` closes it).
    fn fail(self, status: tonic::Status) {
        match self {
            Tx::Sotw(tx) => {
                let _ = tx.send(Err(status));
            }
            Tx::Delta(tx) => {
                let _ = tx.send(Err(status));
            }
        }
    }
}

// === impl Ads ===

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .open(Tx::Sotw(tx), request.into_inner(), Shared::on_sotw)
            .ok_or_else(paused)?;
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .open(Tx::Delta(tx), request.into_inner(), Shared::on_delta)
            .ok_or_else(paused)?;
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

// === impl Sds ===

/// The secret discovery service over the control plane's state (see
/// [`ControlPlane::serve_sds_unix`]).
struct Sds {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = UnboundedReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaSecretsStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamSecretsStream>, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .open(Tx::Sotw(tx), request.into_inner(), Shared::on_sotw)
            .ok_or_else(paused)?;
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaSecretsStream>, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .open(Tx::Delta(tx), request.into_inner(), Shared::on_delta)
            .ok_or_else(paused)?;
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        _request: tonic::Request<DiscoveryRequest>,
    ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the test SDS server streams only",
        ))
    }
}

fn paused() -> tonic::Status {
    tonic::Status::unavailable("test control plane is paused")
}

// === helpers ===

/// Parses a resource written as YAML or JSON (Envoy's JSON mapping) into an
/// `Any` of `type_url` (see `xds_client::bootstrap::any_from_text`).
pub fn any_from_yaml(type_url: &str, text: &str) -> anyhow::Result<Any> {
    xds_client::bootstrap::any_from_text(type_url, text)
        .map_err(|e| anyhow!("invalid {} resource: {e}\n{text}", short_type(type_url)))
}

/// The name of an xDS resource: its `name` field, or `cluster_name` for a
/// ClusterLoadAssignment. Works for any message type the descriptor pool
/// knows (Listener, Cluster, RouteConfiguration, ClusterLoadAssignment,
/// Secret, ...).
pub fn resource_name(any: &Any) -> anyhow::Result<String> {
    let msg = xds_client::descriptors::decode_any(&any.type_url, &any.value)
        .map_err(|e| anyhow!("cannot read the resource's name: {e}"))?;
    // A WDS workload is named by its uid (its `name` is the pod's).
    let fields: &[&str] = if any.type_url == type_url::WORKLOAD {
        &["uid"]
    } else {
        &["name", "cluster_name"]
    };
    for field in fields {
        let value = msg.get_field_by_name(field);
        if let Some(name) = value.as_deref().and_then(|v| v.as_str()) {
            if !name.is_empty() {
                return Ok(name.to_owned());
            }
        }
    }
    bail!("{} resource has no name", short_type(&any.type_url))
}

fn check_type(type_url: &str, any: &Any) -> anyhow::Result<()> {
    if any.type_url != type_url {
        bail!(
            "resource of type {:?} given for type {type_url:?}",
            any.type_url
        );
    }
    Ok(())
}

fn is_wildcard_type(type_url: &str) -> bool {
    type_url == type_url::LISTENER
        || type_url == type_url::CLUSTER
        || type_url == type_url::WORKLOAD
}

fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

fn parse_version(v: &str) -> anyhow::Result<u64> {
    v.parse()
        .with_context(|| format!("version {v:?} is not one of this control plane's versions"))
}

fn version_at_least(v: &str, min: u64) -> bool {
    v.parse::<u64>().is_ok_and(|v| v >= min)
}

/// A nonce unique within this control plane.
fn new_nonce(counter: &mut u64) -> String {
    *counter += 1;
    format!("n{counter}")
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= MAX_RECORDS {
        q.pop_front();
    }
    q.push_back(item);
}

impl ControlPlane {
    /// A bootstrap that takes listeners and clusters over ADS from this
    /// control plane (`DELTA_GRPC` when `delta`, else `GRPC`), with
    /// `set_node_on_first_message_only`, through the static HTTP/2 cluster
    /// `xds-grpc` (TCP or Unix socket, as the server listens), admin on
    /// 127.0.0.1:`admin`. `node` is YAML for the `node` field.
    pub fn ads_bootstrap(&self, node: &str, delta: bool, admin: u16) -> String {
        let address = match (self.addr(), self.unix_path()) {
            (Some(a), _) => format!(
                "socket_address: {{address: {}, port_value: {}}}",
                a.ip(),
                a.port()
            ),
            (None, Some(p)) => format!("pipe: {{path: \"{}\"}}", p.display()),
            (None, None) => unreachable!("a control plane listens on TCP or a Unix socket"),
        };
        format!(
            r#"
node: {node}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{{address}}}}}
"#,
            api = if delta { "DELTA_GRPC" } else { "GRPC" },
        )
    }
}

/// YAML builders for the resources the xDS tests push (Envoy's JSON
/// mapping; feed them to [`ControlPlane::set_yaml`] / `upsert_yaml`).
pub mod yaml {
    /// An EDS cluster whose endpoints come over ADS.
    pub fn eds_cluster(name: &str) -> String {
        format!(
            r#"
name: {name}
type: EDS
connect_timeout: 1s
eds_cluster_config:
  eds_config: {{ads: {{}}, resource_api_version: V3}}
"#
        )
    }

    /// A ClusterLoadAssignment with one 127.0.0.1 endpoint per port.
    pub fn endpoints(cluster: &str, ports: &[u16]) -> String {
        let eps: Vec<String> = ports
            .iter()
            .map(|p| {
                format!("    - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}")
            })
            .collect();
        format!(
            "cluster_name: {cluster}\nendpoints:\n  - lb_endpoints:\n{}\n",
            eps.join("\n")
        )
    }

    /// A listener on 127.0.0.1:`port` whose HCM (stat prefix `name`) takes
    /// route configuration `route` over ADS.
    pub fn rds_listener(name: &str, port: u16, route: &str) -> String {
        format!(
            r#"
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {name}
      rds:
        route_config_name: {route}
        config_source: {{ads: {{}}, resource_api_version: V3}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        )
    }

    /// A route configuration with one vhost for every domain: the `extra`
    /// routes (YAML list items at indent 2, starting with a newline), then
    /// `/` to `cluster`.
    pub fn route(name: &str, cluster: &str, extra: &str) -> String {
        format!(
            r#"
name: {name}
virtual_hosts:
- name: all
  domains: ["*"]
  routes:{extra}
  - match: {{prefix: /}}
    route: {{cluster: {cluster}}}
"#
        )
    }
}

#[cfg(test)]
mod tests {
    //! Paths real Envoy does not take in `tests/tests/xds_envoy.rs`, driven
    //! by the generated tonic client.
    use super::*;
    use xds_client::api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient as Client;

    const T: Duration = Duration::from_secs(5);

    fn route(name: &str) -> Any {
        any_from_yaml(type_url::ROUTE, &format!("name: {name}")).expect("route")
    }

    fn cluster(name: &str) -> Any {
        any_from_yaml(
            type_url::CLUSTER,
            &format!("{{name: {name}, type: STATIC}}"),
        )
        .expect("cluster")
    }

    async fn client(cp: &ControlPlane) -> Client<tonic::transport::Channel> {
        let addr = cp.addr().expect("tcp");
        Client::connect(format!("http://{addr}"))
            .await
            .expect("connect")
    }

    fn names(resources: &[Any]) -> Vec<String> {
        resources
            .iter()
            .map(|a| resource_name(a).expect("name"))
            .collect()
    }

    #[tokio::test]
    async fn sotw_sends_subscribed_names_only_and_not_on_ack() {
        let cp = ControlPlane::start().await.expect("start");
        cp.set(type_url::ROUTE, vec![route("r1"), route("r2")])
            .expect("set");
        let (tx, rx) = mpsc::unbounded_channel();
        let mut resp = client(&cp)
            .await
            .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let req = |names: &[&str], nonce: &str| DiscoveryRequest {
            type_url: type_url::ROUTE.to_owned(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        };
        tx.send(req(&["r1"], "")).expect("send");
        let first = resp.message().await.expect("ok").expect("response");
        assert_eq!(names(&first.resources), ["r1"]);
        tx.send(req(&["r1"], &first.nonce)).expect("send");
        let ack = cp.wait_for_ack(type_url::ROUTE, "1", T).await.expect("ack");
        assert_eq!(ack.nonce, first.nonce);
        // A change to an unsubscribed name sends nothing; removal of a
        // subscribed one sends the set without it.
        cp.remove(type_url::ROUTE, "r2");
        let v = cp.remove(type_url::ROUTE, "r1");
        let next = resp.message().await.expect("ok").expect("response");
        assert!(next.resources.is_empty());
        assert_eq!(next.version_info, v);
        assert_eq!(cp.sent().len(), 2, "{:#?}", cp.sent());

        cp.pause(true);
        let refused = client(&cp)
            .await
            .stream_aggregated_resources(UnboundedReceiverStream::new(mpsc::unbounded_channel().1))
            .await
            .expect_err("paused");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(cp.streams_refused(), 1);
    }

    #[tokio::test]
    async fn delta_honours_initial_resource_versions() {
        let cp = ControlPlane::start().await.expect("start");
        cp.upsert(type_url::CLUSTER, cluster("a")).expect("a");
        cp.upsert(type_url::CLUSTER, cluster("b")).expect("b");
        let (tx, rx) = mpsc::unbounded_channel();
        let mut resp = client(&cp)
            .await
            .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let initial = [("a", "1"), ("b", "0"), ("gone", "9")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        tx.send(DeltaDiscoveryRequest {
            type_url: type_url::CLUSTER.to_owned(),
            initial_resource_versions: initial,
            ..Default::default()
        })
        .expect("send");
        let first = resp.message().await.expect("ok").expect("response");
        let sent: Vec<_> = first
            .resources
            .iter()
            .map(|r| (&*r.name, &*r.version))
            .collect();
        assert_eq!(sent, [("b", "2")], "a is current, b is stale");
        assert_eq!(first.removed_resources, ["gone"]);
        tx.send(DeltaDiscoveryRequest {
            type_url: type_url::CLUSTER.to_owned(),
            response_nonce: first.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 13,
                message: "no".to_owned(),
                details: Vec::new(),
            }),
            ..Default::default()
        })
        .expect("send");
        let nack = cp
            .wait_for_nack(type_url::CLUSTER, "2", T)
            .await
            .expect("nack");
        assert_eq!(nack.error.message, "no");
        assert!(cp
            .wait_for_ack(type_url::CLUSTER, "1", Duration::from_millis(100))
            .await
            .is_err());
        // Same bytes again: no new version, nothing sent.
        cp.upsert(type_url::CLUSTER, cluster("a")).expect("a");
        assert_eq!(
            cp.resource_version(type_url::CLUSTER, "a").as_deref(),
            Some("1")
        );
        assert_eq!(cp.sent().len(), 1);
        cp.disconnect_all();
        let end = resp.message().await.expect_err("closed");
        assert_eq!(end.code(), tonic::Code::Unavailable);
    }
}
