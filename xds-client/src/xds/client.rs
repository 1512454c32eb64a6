//! The subscriptions: gRPC streams (ADS or per-type, state of the world or
//! delta) and watched files, feeding one [`DynamicState`].
//!
//! Every accepted change re-assembles a snapshot and hands it to the
//! `on_snapshot` callback (the proxy applies it); ACK/NACK go back on the
//! stream that carried the response. Streams reconnect with jittered
//! exponential back-off and resubscribe with the versions they hold; while
//! the server is away the last good configuration keeps serving.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{future::BoxFuture, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, watch},
};

use crate::api::envoy::config::core::v3 as core;
use crate::api::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::api::google::rpc::Status;
use crate::config::{ApiSource, GrpcTarget, Snapshot, SourceKind};

use super::resources::ResourceType;
use super::state::{Applied, Change, DynamicState, Interest, Wanted};

/// A byte stream to an xDS server.
pub trait XdsIoStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> XdsIoStream for T {}
pub type XdsIo = Box<dyn XdsIoStream>;

/// Opens connections to gRPC targets (the proxy knows clusters, Unix
/// sockets and TLS).
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, target: &GrpcTarget) -> BoxFuture<'static, std::io::Result<XdsIo>>;
}

/// What happened, for stats and logs.
#[derive(Debug, Clone)]
pub enum Event {
    /// A response of this type arrived (`update_attempt`).
    Attempt(ResourceType),
    /// Everything in it was accepted (`update_success`, `version_text`).
    Accepted { rt: ResourceType, version: String },
    /// Something was rejected (`update_rejected`); the NACK's detail.
    Rejected { rt: ResourceType, detail: String },
    /// A stream to an xDS server is up or down (`control_plane.connected_state`).
    Connected(bool),
}

/// `(snapshot, what changed since the previous one, init_done)`.
type SnapshotFn = Box<dyn Fn(Arc<Snapshot>, &Change, bool) + Send + Sync>;
type EventFn = Box<dyn Fn(Event) + Send + Sync>;
/// Every workload held after a WDS change.
pub type WorkloadsFn = Box<dyn Fn(Vec<Arc<crate::config::Workload>>) + Send + Sync>;

/// The xDS client of one proxy.
pub struct XdsClient {
    node: core::Node,
    state: Mutex<DynamicState>,
    connector: Arc<dyn Connector>,
    on_snapshot: SnapshotFn,
    on_event: EventFn,
    wanted: watch::Sender<Wanted>,
    /// Streams currently connected.
    connected: std::sync::atomic::AtomicUsize,
    /// Told of the workloads after each WDS change (see [`XdsClient::on_workloads`]).
    on_workloads: std::sync::OnceLock<WorkloadsFn>,
}

/// Envoy's default retry back-off: 500 ms base, 30 s cap, jittered.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest response accepted (a full-mesh snapshot of thousands of
/// clusters is tens of MiB).
const MAX_MESSAGE: usize = 256 << 20;
/// The `error_detail` code of a NACK: INTERNAL, as Envoy sends.
const NACK_CODE: i32 = 13;

impl XdsClient {
    /// `node` is sent to servers (with `user_agent_*` filled in by the
    /// caller). `on_snapshot(snapshot, init_done)` runs after each accepted
    /// change, on the client's runtime, before the ACK is sent.
    pub fn new(
        base: Arc<Snapshot>,
        node: core::Node,
        connector: Arc<dyn Connector>,
        on_snapshot: SnapshotFn,
        on_event: EventFn,
    ) -> Arc<Self> {
        let state = DynamicState::new(base);
        let wanted = state.wanted();
        Arc::new(XdsClient {
            node,
            state: Mutex::new(state),
            connector,
            on_snapshot,
            on_event,
            wanted: watch::channel(wanted).0,
            connected: std::sync::atomic::AtomicUsize::new(0),
            on_workloads: std::sync::OnceLock::new(),
        })
    }

    /// Sets what receives the workloads after each accepted WDS change
    /// (set before [`XdsClient::run`]; a second call is ignored). WDS
    /// changes do not re-assemble the snapshot: workloads go only here.
    pub fn on_workloads(&self, f: WorkloadsFn) {
        let _ = self.on_workloads.set(f);
    }

    /// Runs with the state locked (config dump, stats).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut DynamicState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Starts the streams and the initial-fetch timer on the current
    /// runtime; returns when every subscription is running (never ends).
    pub async fn run(self: Arc<Self>) {
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let w = st.wanted();
            st.note_wanted(&w);
        }
        let mut started: BTreeSet<String> = BTreeSet::new();
        let mut rx = self.wanted.subscribe();
        loop {
            let wanted = rx.borrow_and_update().clone();
            for (src, types) in &wanted {
                match src {
                    SourceKind::Ads => {
                        if started.insert("ads".into()) {
                            if let Some(api) = self.with_state(|s| s.base().dynamic.ads.clone()) {
                                tokio::spawn(self.clone().grpc_stream(api, None));
                            }
                        }
                    }
                    SourceKind::Grpc(api) => {
                        for rt in types.keys() {
                            if started.insert(format!("{api:?}/{rt:?}")) {
                                tokio::spawn(self.clone().grpc_stream(api.clone(), Some(*rt)));
                            }
                        }
                    }
                    SourceKind::Path(p) => {
                        if started.insert(format!("path:{}", p.display())) {
                            tokio::spawn(self.clone().watch_file(p.clone()));
                        }
                    }
                }
            }
            let deadline = self.with_state(|s| s.next_deadline());
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = sleep => {
                    let changed = self.with_state(|s| s.expire(Instant::now()));
                    if changed {
                        self.republish(false);
                    }
                }
            }
        }
    }

    /// Re-assembles and publishes after a state change. Subscriptions
    /// derive from listeners and clusters only: after an RDS, EDS or SDS
    /// change (`subscriptions` false) they are not recomputed, which keeps
    /// an endpoint update from walking every cluster twice more.
    fn republish(&self, subscriptions: bool) {
        let (snap, change, init, wanted) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let w = subscriptions.then(|| {
                let w = st.wanted();
                st.note_wanted(&w);
                w
            });
            let (snap, change) = st.assemble();
            (snap, change, st.init_done(), w)
        };
        (self.on_snapshot)(snap, &change, init);
        if let Some(wanted) = wanted {
            self.wanted.send_if_modified(|cur| {
                if *cur != wanted {
                    *cur = wanted;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Applies one response and publishes; returns what happened.
    fn on_response(
        &self,
        rt: ResourceType,
        resources: &[(Option<String>, crate::api::google::protobuf::Any, String)],
        removed: &[String],
        sotw_full: bool,
        version: &str,
    ) -> Applied {
        (self.on_event)(Event::Attempt(rt));
        let applied = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let a = st.apply(rt, resources, removed, sotw_full);
            if a.rejected.is_empty() && sotw_full || a.rejected.is_empty() && !version.is_empty() {
                st.type_versions.insert(rt, version.to_owned());
            }
            a
        };
        if rt == ResourceType::Workload {
            if applied.changed {
                if let Some(f) = self.on_workloads.get() {
                    f(self.with_state(|s| s.workloads()));
                }
            }
        } else if applied.changed || !self.with_state(|s| s.init_done()) {
            // Until the initial fetch completes, any response may complete it.
            self.republish(rt.wildcard());
        }
        match applied.error_detail() {
            None => (self.on_event)(Event::Accepted {
                rt,
                version: version.to_owned(),
            }),
            Some(d) => {
                tracing::warn!(target: "config", type_url = rt.type_url(), "rejected xDS update: {d}");
                (self.on_event)(Event::Rejected { rt, detail: d })
            }
        }
        applied
    }

    fn set_connected(&self, up: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = if up {
            self.connected.fetch_add(1, Relaxed) + 1
        } else {
            self.connected.fetch_sub(1, Relaxed).saturating_sub(1)
        };
        (self.on_event)(Event::Connected(n > 0));
    }

    /// The types this stream serves and what is wanted of each.
    fn interests(
        &self,
        api: &ApiSource,
        only: Option<ResourceType>,
    ) -> BTreeMap<ResourceType, Interest> {
        let w = self.wanted.borrow();
        let key = match only {
            None => SourceKind::Ads,
            Some(_) => SourceKind::Grpc(api.clone()),
        };
        w.get(&key)
            .map(|m| {
                m.iter()
                    .filter(|(rt, _)| only.is_none_or(|o| o == **rt))
                    .map(|(rt, i)| (*rt, i.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One gRPC subscription: ADS (`only` = None) or one type's own
    /// service; reconnects forever.
    async fn grpc_stream(self: Arc<Self>, api: ApiSource, only: Option<ResourceType>) {
        let mut backoff = BACKOFF_BASE;
        loop {
            let started = Instant::now();
            let got_response = match self.clone().grpc_session(&api, only).await {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(target: "config", target_server = %api.target, "xDS stream failed: {e}");
                    false
                }
            };
            if got_response || started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_BASE;
            }
            let jitter = rand_jitter(backoff);
            tokio::time::sleep(jitter).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life. Ok(true) when at least one response came.
    async fn grpc_session(
        self: Arc<Self>,
        api: &ApiSource,
        only: Option<ResourceType>,
    ) -> Result<bool, String> {
        let channel = self.channel(api).await?;
        let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
        grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
        let path = match only {
            None if api.delta => {
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
            }
            None => {
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
            }
            Some(rt) => rt.grpc_path(api.delta),
        };
        let path = http::uri::PathAndQuery::from_static(path);
        let r = if api.delta {
            let (tx, inbound) =
                open_stream::<DeltaDiscoveryRequest, DeltaDiscoveryResponse>(&mut grpc, path)
                    .await?;
            self.set_connected(true);
            self.delta_loop(api, only, tx, inbound).await
        } else {
            let (tx, inbound) =
                open_stream::<DiscoveryRequest, DiscoveryResponse>(&mut grpc, path).await?;
            self.set_connected(true);
            self.sotw_loop(api, only, tx, inbound).await
        };
        self.set_connected(false);
        r
    }

    async fn channel(&self, api: &ApiSource) -> Result<tonic::transport::Channel, String> {
        let connector = self.connector.clone();
        let target = api.target.clone();
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", api.authority))
            .or_else(|_| tonic::transport::Endpoint::from_shared("http://xds".to_owned()))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        endpoint
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let fut = connector.connect(&target);
                async move { fut.await.map(hyper_util::rt::TokioIo::new) }
            }))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", api.target))
    }

    fn node_once(&self, api: &ApiSource, first: &mut bool) -> Option<core::Node> {
        let send = *first || !api.set_node_on_first_message_only;
        *first = false;
        send.then(|| self.node.clone())
    }

    async fn sotw_loop(
        &self,
        api: &ApiSource,
        only: Option<ResourceType>,
        tx: mpsc::UnboundedSender<DiscoveryRequest>,
        mut inbound: tonic::Streaming<DiscoveryResponse>,
    ) -> Result<bool, String> {
        let mut first = true;
        let mut got = false;
        // Per type: the names last requested and the last nonce.
        let mut sent: BTreeMap<ResourceType, (Interest, String)> = BTreeMap::new();
        let mut wanted_rx = self.wanted.subscribe();
        wanted_rx.mark_changed();
        loop {
            tokio::select! {
                r = wanted_rx.changed() => {
                    if r.is_err() { return Ok(got) }
                    let interests = self.interests(api, only);
                    for rt in ResourceType::ALL {
                        let Some(i) = interests.get(&rt) else { continue };
                        if sent.get(&rt).is_some_and(|(s, _)| s == i) {
                            continue;
                        }
                        let nonce = sent.get(&rt).map(|(_, n)| n.clone()).unwrap_or_default();
                        let version = self.with_state(|s| s.type_versions.get(&rt).cloned().unwrap_or_default());
                        let req = DiscoveryRequest {
                            version_info: version,
                            node: self.node_once(api, &mut first),
                            resource_names: names(i),
                            type_url: rt.type_url().to_owned(),
                            response_nonce: nonce.clone(),
                            ..Default::default()
                        };
                        sent.insert(rt, (i.clone(), nonce));
                        tx.send(req).map_err(|_| "stream closed".to_owned())?;
                    }
                }
                msg = inbound.next() => {
                    let resp = match msg {
                        None => return Err("server closed the stream".into()),
                        Some(Err(s)) => return Err(format!("stream error: {s}")),
                        Some(Ok(r)) => r,
                    };
                    got = true;
                    let Some(rt) = ResourceType::from_url(&resp.type_url) else {
                        tracing::warn!(target: "config", "ignoring xDS response of unknown type {:?}", resp.type_url);
                        continue;
                    };
                    let mut resources = Vec::with_capacity(resp.resources.len());
                    let mut bad = Vec::new();
                    for a in &resp.resources {
                        match super::resources::unwrap_any(a) {
                            Ok((n, a)) => resources.push((n, a, resp.version_info.clone())),
                            Err(e) => bad.push(e),
                        }
                    }
                    let applied = self.on_response(rt, &resources, &[], rt.wildcard(), &resp.version_info);
                    let mut detail = applied.error_detail();
                    if !bad.is_empty() {
                        detail = Some([detail.unwrap_or_default(), bad.join("\n")].join("\n").trim().to_owned());
                    }
                    let interest = self.interests(api, only).get(&rt).cloned()
                        .unwrap_or_else(|| Interest::Names(BTreeSet::new()));
                    let version = self.with_state(|s| s.type_versions.get(&rt).cloned().unwrap_or_default());
                    let req = DiscoveryRequest {
                        version_info: version,
                        node: self.node_once(api, &mut first),
                        resource_names: names(&interest),
                        type_url: rt.type_url().to_owned(),
                        response_nonce: resp.nonce.clone(),
                        error_detail: detail.map(|m| Status { code: NACK_CODE, message: m, details: vec![] }),
                        ..Default::default()
                    };
                    sent.insert(rt, (interest, resp.nonce));
                    tx.send(req).map_err(|_| "stream closed".to_owned())?;
                }
            }
        }
    }

    async fn delta_loop(
        &self,
        api: &ApiSource,
        only: Option<ResourceType>,
        tx: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        mut inbound: tonic::Streaming<DeltaDiscoveryResponse>,
    ) -> Result<bool, String> {
        let mut first = true;
        let mut got = false;
        let mut sent: BTreeMap<ResourceType, Interest> = BTreeMap::new();
        let mut wanted_rx = self.wanted.subscribe();
        wanted_rx.mark_changed();
        loop {
            tokio::select! {
                r = wanted_rx.changed() => {
                    if r.is_err() { return Ok(got) }
                    let interests = self.interests(api, only);
                    for rt in ResourceType::ALL {
                        let Some(i) = interests.get(&rt) else { continue };
                        let req = match sent.get(&rt) {
                            Some(s) if s == i => continue,
                            None => {
                                // Initial request: what we want and what we hold.
                                let held = self.with_state(|s| s.versions(rt));
                                let held: std::collections::HashMap<String, String> = match i {
                                    Interest::Wildcard => held.into_iter().collect(),
                                    Interest::Names(ns) => held.into_iter().filter(|(n, _)| ns.contains(n.as_str())).collect(),
                                };
                                DeltaDiscoveryRequest {
                                    node: self.node_once(api, &mut first),
                                    type_url: rt.type_url().to_owned(),
                                    resource_names_subscribe: names(i),
                                    initial_resource_versions: held,
                                    ..Default::default()
                                }
                            }
                            Some(prev) => {
                                let (old, new) = (set(prev), set(i));
                                DeltaDiscoveryRequest {
                                    node: self.node_once(api, &mut first),
                                    type_url: rt.type_url().to_owned(),
                                    resource_names_subscribe: new.difference(&old).cloned().collect(),
                                    resource_names_unsubscribe: old.difference(&new).cloned().collect(),
                                    ..Default::default()
                                }
                            }
                        };
                        sent.insert(rt, i.clone());
                        tx.send(req).map_err(|_| "stream closed".to_owned())?;
                    }
                }
                msg = inbound.next() => {
                    let resp = match msg {
                        None => return Err("server closed the stream".into()),
                        Some(Err(s)) => return Err(format!("stream error: {s}")),
                        Some(Ok(r)) => r,
                    };
                    got = true;
                    let Some(rt) = ResourceType::from_url(&resp.type_url) else {
                        tracing::warn!(target: "config", "ignoring xDS response of unknown type {:?}", resp.type_url);
                        continue;
                    };
                    let resources: Vec<_> = resp
                        .resources
                        .iter()
                        .filter_map(|r| r.resource.as_ref().map(|a| (Some(r.name.clone()), a.clone(), r.version.clone())))
                        .collect();
                    let applied = self.on_response(rt, &resources, &resp.removed_resources, false, &resp.system_version_info);
                    let req = DeltaDiscoveryRequest {
                        node: self.node_once(api, &mut first),
                        type_url: rt.type_url().to_owned(),
                        response_nonce: resp.nonce.clone(),
                        error_detail: applied.error_detail().map(|m| Status { code: NACK_CODE, message: m, details: vec![] }),
                        ..Default::default()
                    };
                    tx.send(req).map_err(|_| "stream closed".to_owned())?;
                }
            }
        }
    }

    /// Filesystem xDS: the file holds a `DiscoveryResponse` (YAML or
    /// JSON); it is re-read whenever its modification time or size changes.
    async fn watch_file(self: Arc<Self>, path: PathBuf) {
        let mut last: Option<(std::time::SystemTime, u64)> = None;
        loop {
            let stamp = std::fs::metadata(&path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            if stamp.is_some() && stamp != last {
                last = stamp;
                match std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| parse_discovery_response(&t))
                {
                    Ok(resp) => {
                        let mut by_type: BTreeMap<ResourceType, Vec<_>> = BTreeMap::new();
                        let mut unknown = Vec::new();
                        for a in &resp.resources {
                            match super::resources::unwrap_any(a) {
                                Ok((n, a)) => match ResourceType::from_url(&a.type_url) {
                                    Some(rt) => by_type.entry(rt).or_default().push((
                                        n,
                                        a,
                                        resp.version_info.clone(),
                                    )),
                                    None => unknown.push(a.type_url.clone()),
                                },
                                Err(e) => unknown.push(e),
                            }
                        }
                        if !unknown.is_empty() {
                            tracing::warn!(target: "config", path = %path.display(), "ignored resources: {unknown:?}");
                        }
                        if let Some(rt) = ResourceType::from_url(&resp.type_url) {
                            by_type.entry(rt).or_default();
                        }
                        for (rt, res) in by_type {
                            self.on_response(rt, &res, &[], rt.wildcard(), &resp.version_info);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(target: "config", path = %path.display(), "cannot load xDS file: {e}")
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Opens a bidirectional gRPC stream on `path`: requests go in through the
/// returned sender, responses come out of the returned stream.
async fn open_stream<Req, Resp>(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: http::uri::PathAndQuery,
) -> Result<(mpsc::UnboundedSender<Req>, tonic::Streaming<Resp>), String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Req>();
    let out =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let resp = grpc
        .streaming(
            tonic::Request::new(out),
            path,
            tonic_prost::ProstCodec::<Req, Resp>::default(),
        )
        .await
        .map_err(|s| format!("stream refused: {s}"))?;
    Ok((tx, resp.into_inner()))
}

/// Parses a `DiscoveryResponse` written as YAML or JSON.
pub fn parse_discovery_response(text: &str) -> Result<DiscoveryResponse, String> {
    use prost::Message;
    let any = crate::bootstrap::any_from_text(
        "type.googleapis.com/envoy.service.discovery.v3.DiscoveryResponse",
        text,
    )
    .map_err(|e| e.to_string())?;
    DiscoveryResponse::decode(any.value.as_slice()).map_err(|e| e.to_string())
}

fn names(i: &Interest) -> Vec<String> {
    match i {
        Interest::Wildcard => Vec::new(),
        Interest::Names(ns) => ns.iter().map(|n| n.to_string()).collect(),
    }
}

fn set(i: &Interest) -> BTreeSet<String> {
    names(i).into_iter().collect()
}

fn rand_jitter(d: Duration) -> Duration {
    // Full jitter over [d/2, d] without a random crate: the clock's
    // sub-microsecond bits are noise enough for spreading reconnects.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let frac = f64::from(nanos % 1000) / 1000.0;
    d.mul_f64(0.5 + 0.5 * frac)
}
