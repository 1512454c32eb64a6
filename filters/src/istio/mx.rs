//! Istio's TCP metadata exchange (`envoy.tcp.metadataexchange.config.MetadataExchange`,
//! network filter `istio.metadata_exchange` downstream and as a cluster
//! filter upstream), as istio/proxy's `metadata_exchange.cc`: on a
//! connection whose negotiated ALPN is the filter's `protocol`
//! (`istio-peer-exchange`), each side sends, before any application byte,
//!
//! ```text
//! magic 0x3D230467 (u32, big endian) | length (u32, big endian) |
//! google.protobuf.Any { type_url: type.googleapis.com/google.protobuf.Struct,
//!   value: Struct { "x-envoy-peer-metadata": <node metadata as Istio's
//!   WorkloadMetadataObject struct>, "x-envoy-peer-metadata-id": <node.id> } }
//! ```
//!
//! and reads the peer's from the head of the byte stream, removing it;
//! what follows is the application's. The peer becomes filter state
//! `downstream_peer` (listener side) or `upstream_peer` (cluster side) for
//! `istio.stats`. A connection without the ALPN passes unchanged
//! (`alpn_protocol_not_found`); so does one whose first bytes are not the
//! magic (`initial_header_not_found`: the peer has no exchange).
//!
//! This module is sans-IO: [`MetadataExchange`] holds the config, our
//! encoded header and the stats; [`HeaderReader`] takes bytes as they come.
//! The proxy wraps the connection's reads with it.
use std::sync::Arc;

use prost::Message;
use prost_types::{value::Kind, Struct, Value};
use xds_client::config::MetadataExchangeConfig;

use super::{LocalNode, PeerInfo};
use crate::http::{Counter, StatsScope};

/// Istio's `MetadataExchangeInitialHeader::magic_number`.
pub const MAGIC: u32 = 0x3D23_0467;
/// The initial header: magic and length.
pub const INITIAL_HEADER_LEN: usize = 8;
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";
const PEER_METADATA: &str = "x-envoy-peer-metadata";
const PEER_METADATA_ID: &str = "x-envoy-peer-metadata-id";
/// The largest peer header weir buffers. Istio has no limit (Envoy's
/// buffer watermarks stall the connection instead); weir closes a
/// connection announcing more.
pub const MAX_HEADER: usize = 64 * 1024;

/// `metadata_exchange.*` counters (in the root scope, as Istio's).
pub struct MxStats {
    pub alpn_protocol_found: Arc<dyn Counter>,
    pub alpn_protocol_not_found: Arc<dyn Counter>,
    pub initial_header_not_found: Arc<dyn Counter>,
    pub header_not_found: Arc<dyn Counter>,
    pub metadata_added: Arc<dyn Counter>,
}

impl std::fmt::Debug for MxStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MxStats(..)")
    }
}

impl MxStats {
    pub fn new(scope: &Arc<dyn StatsScope>) -> MxStats {
        MxStats::with(|n| scope.counter(n))
    }

    /// The counters, each created by `counter` from its full name.
    pub fn with(counter: impl Fn(&str) -> Arc<dyn Counter>) -> MxStats {
        let c = |n: &str| counter(&format!("metadata_exchange.{n}"));
        MxStats {
            alpn_protocol_found: c("alpn_protocol_found"),
            alpn_protocol_not_found: c("alpn_protocol_not_found"),
            initial_header_not_found: c("initial_header_not_found"),
            header_not_found: c("header_not_found"),
            metadata_added: c("metadata_added"),
        }
    }
}

/// One filter's runtime (per listener chain or per cluster).
#[derive(Debug)]
pub struct MetadataExchange {
    pub config: Arc<MetadataExchangeConfig>,
    pub stats: MxStats,
    /// Our header, encoded once.
    header: Arc<[u8]>,
}

impl MetadataExchange {
    pub fn new(
        config: Arc<MetadataExchangeConfig>,
        local: &LocalNode,
        stats: MxStats,
    ) -> MetadataExchange {
        let header = encode(local, &config.additional_labels).into();
        MetadataExchange {
            stats,
            config,
            header,
        }
    }

    /// Whether the exchange runs on a connection that negotiated `alpn`
    /// (counts `alpn_protocol_found` / `_not_found`, as Istio at the
    /// connection's first byte either way).
    pub fn applies(&self, alpn: Option<&[u8]>) -> bool {
        let found = alpn.unwrap_or_default() == self.config.protocol.as_bytes();
        if found {
            self.stats.alpn_protocol_found.inc();
        } else {
            self.stats.alpn_protocol_not_found.inc();
        }
        found
    }

    /// Our header, to write before any application byte (counts
    /// `metadata_added`).
    pub fn our_header(&self) -> Arc<[u8]> {
        self.stats.metadata_added.inc();
        self.header.clone()
    }

    /// A reader of the peer's header.
    pub fn reader(self: &Arc<Self>) -> HeaderReader {
        HeaderReader {
            mx: self.clone(),
            length: None,
        }
    }
}

/// Our node as Istio sends it: `node.metadata` reduced to the workload
/// fields (`convertStructToWorkloadMetadata` with the node's locality, then
/// back), and `node.id`.
pub fn encode(local: &LocalNode, additional_labels: &[String]) -> Vec<u8> {
    let me = PeerInfo::local(
        &local.metadata,
        &local.region,
        &local.zone,
        additional_labels,
    );
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        PEER_METADATA.to_owned(),
        Value {
            kind: Some(Kind::StructValue(me.to_struct())),
        },
    );
    if !local.id.is_empty() {
        fields.insert(
            PEER_METADATA_ID.to_owned(),
            Value {
                kind: Some(Kind::StringValue(local.id.clone())),
            },
        );
    }
    // prost writes map entries in key order: Istio's deterministic
    // serialisation.
    let any = prost_types::Any {
        type_url: STRUCT_TYPE_URL.to_owned(),
        value: Struct { fields }.encode_to_vec(),
    };
    let body = any.encode_to_vec();
    let mut out = Vec::with_capacity(INITIAL_HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// What [`HeaderReader::feed`] found in the bytes so far.
#[derive(Debug, PartialEq)]
pub enum Read {
    /// Not enough bytes yet: keep them and feed more.
    More,
    /// The peer's header: `consumed` bytes are it; the rest is the
    /// application's. `peer` is `None` when the struct had no
    /// `x-envoy-peer-metadata` (Istio then sets no peer).
    Peer {
        peer: Option<Box<PeerInfo>>,
        consumed: usize,
    },
    /// No exchange (not the magic): every byte is the application's.
    NotExchange,
    /// The magic, then an unreadable body: the initial header is dropped
    /// (`consumed`), the rest passes (Istio's `header_not_found`).
    Unreadable { consumed: usize },
    /// A header longer than [`MAX_HEADER`]: close the connection.
    TooLong,
}

/// Reads the peer's header from the head of the stream (Istio's
/// `tryReadInitialProxyHeader` and `tryReadProxyData`).
#[derive(Debug)]
pub struct HeaderReader {
    mx: Arc<MetadataExchange>,
    /// The announced length, once the initial header was read.
    length: Option<usize>,
}

impl HeaderReader {
    /// Looks at everything received so far (`buf`, from the stream's
    /// start); `end`: the peer closed its side.
    pub fn feed(&mut self, buf: &[u8], end: bool) -> Read {
        let s = &self.mx.stats;
        let len = match self.length {
            Some(l) => l,
            None => {
                if buf.len() < INITIAL_HEADER_LEN {
                    // As Istio: counted each time the initial header is
                    // incomplete; a half-closed peer ends the exchange.
                    s.initial_header_not_found.inc();
                    return if end { Read::NotExchange } else { Read::More };
                }
                let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                if magic != MAGIC {
                    s.initial_header_not_found.inc();
                    return Read::NotExchange;
                }
                let l = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                if l > MAX_HEADER {
                    return Read::TooLong;
                }
                self.length = Some(l);
                l
            }
        };
        let total = INITIAL_HEADER_LEN + len;
        if buf.len() < total {
            return Read::More;
        }
        let body = &buf[INITIAL_HEADER_LEN..total];
        let Ok(any) = prost_types::Any::decode(body) else {
            s.header_not_found.inc();
            return Read::Unreadable {
                consumed: INITIAL_HEADER_LEN,
            };
        };
        // Istio's `anyConvert` to a Struct (whatever the type URL says).
        let Ok(st) = Struct::decode(any.value.as_slice()) else {
            s.header_not_found.inc();
            return Read::Unreadable {
                consumed: INITIAL_HEADER_LEN,
            };
        };
        let peer = match st.fields.get(PEER_METADATA).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(m)) => Some(Box::new(PeerInfo::from_struct(
                m,
                &self.mx.config.additional_labels,
            ))),
            // Istio reads `struct_value()` of whatever is there: an empty
            // struct, a peer with nothing known.
            Some(_) => Some(Box::default()),
            None => None,
        };
        Read::Peer {
            peer,
            consumed: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(labels: &[&str]) -> Arc<MetadataExchange> {
        let scope: Arc<dyn StatsScope> = Arc::new(crate::http::NoStats);
        let local = LocalNode::new(&xds_client::config::Node {
            id: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".into(),
            metadata: serde_json::json!({
                "NAME": "a-1", "NAMESPACE": "ns", "CLUSTER_ID": "c1", "WORKLOAD_NAME": "a",
                "LABELS": {"app": "a", "version": "v1", "team": "x"},
                "ISTIO_VERSION": "1.28",
            }),
            ..Default::default()
        });
        Arc::new(MetadataExchange::new(
            Arc::new(MetadataExchangeConfig {
                protocol: "istio-peer-exchange".into(),
                additional_labels: labels.iter().map(|s| (*s).to_owned()).collect(),
                enable_discovery: false,
            }),
            &local,
            MxStats::new(&scope),
        ))
    }

    #[test]
    fn our_header_round_trips_in_pieces() {
        let m = mx(&["team"]);
        let h = m.our_header();
        assert_eq!(&h[..4], &[0x3D, 0x23, 0x04, 0x67]);
        assert_eq!(
            u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize,
            h.len() - 8
        );
        let mut stream = h.to_vec();
        stream.extend_from_slice(b"app bytes");
        let mut r = m.reader();
        for cut in [0, 3, 8, 20] {
            assert_eq!(r.feed(&stream[..cut], false), Read::More, "{cut}");
        }
        let Read::Peer { peer, consumed } = r.feed(&stream, false) else {
            panic!("no peer");
        };
        assert_eq!(consumed, h.len());
        assert_eq!(&stream[consumed..], b"app bytes");
        let peer = peer.expect("peer");
        assert_eq!(
            (
                peer.workload.as_str(),
                peer.namespace.as_str(),
                peer.app.as_str()
            ),
            ("a", "ns", "a")
        );
        assert_eq!(peer.labels, [("team".to_owned(), "x".to_owned())]);
        // The id rides along; the node's other fields do not.
        let any = prost_types::Any::decode(&h[8..]).expect("any");
        assert_eq!(any.type_url, STRUCT_TYPE_URL);
        let st = Struct::decode(any.value.as_slice()).expect("struct");
        assert!(matches!(
            st.fields[PEER_METADATA_ID].kind.as_ref(),
            Some(Kind::StringValue(id)) if id.starts_with("sidecar~")
        ));
        let Some(Kind::StructValue(md)) = st.fields[PEER_METADATA].kind.as_ref() else {
            panic!("metadata");
        };
        assert!(!md.fields.contains_key("ISTIO_VERSION"));
    }

    #[test]
    fn other_bytes_pass_and_bad_bodies_are_dropped() {
        let m = mx(&[]);
        assert_eq!(
            m.reader().feed(b"GET / HTTP/1.1\r\n", false),
            Read::NotExchange
        );
        assert_eq!(m.reader().feed(b"hi", true), Read::NotExchange);
        let mut bad = MAGIC.to_be_bytes().to_vec();
        bad.extend_from_slice(&3u32.to_be_bytes());
        bad.extend_from_slice(&[0xff, 0xff, 0xff, b'x']);
        assert_eq!(
            m.reader().feed(&bad, false),
            Read::Unreadable { consumed: 8 }
        );
        let mut long = MAGIC.to_be_bytes().to_vec();
        long.extend_from_slice(&(MAX_HEADER as u32 + 1).to_be_bytes());
        assert_eq!(m.reader().feed(&long, false), Read::TooLong);
        assert!(m.applies(Some(b"istio-peer-exchange")));
        assert!(!m.applies(Some(b"h2")));
        assert!(!m.applies(None));
    }
}
