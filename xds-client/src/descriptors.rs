//! The protobuf descriptor pool used for Envoy's YAML/JSON mapping.
//!
//! `envoy-types` ships a `FileDescriptorSet` of every Envoy, xds and udpa
//! proto it generates; we add the few messages it lacks as hand-built
//! `FileDescriptorProto`s so no system `protoc` is needed: `TypedStruct`
//! (both spellings) and the configuration messages of Istio's own filters
//! that istiod sends (see [`ISTIO_TYPES`]). The Istio layouts (names,
//! numbers, types) follow istio/proxy's `.proto` files as of its last
//! release before the filters moved into Envoy.
//!
//! The pool is loaded lazily, file by file: decoding the whole set costs
//! tens of MiB, while an xDS workload needs a few dozen of its ~500 files.
//! `build.rs` indexes the set (each file's byte range and dependencies, and
//! the file of every message and enum), and [`message`] / [`load`] add the
//! file defining a type together with its transitive dependencies. Lookups
//! by name (type URLs included) go through them, never through a pool
//! handle alone. A `DynamicMessage` resolves `Any` values through the pool
//! its descriptor came from, which later loads do not change (a
//! `DescriptorPool` is copy-on-write), so code that (de)serialises `Any`s
//! loads their types first and then takes the root descriptor from the pool
//! [`load`] returns (see `bootstrap::json_to_message_collect` and
//! [`dynamic_message`]).
use std::sync::Mutex;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, ReflectMessage, Value};
use prost_types::{
    descriptor_proto::ReservedRange,
    field_descriptor_proto::{Label, Type},
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto, MessageOptions, OneofDescriptorProto,
};

/// envoy-types' descriptor set without source comments (see `build.rs`).
static ENVOY_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// One file of [`ENVOY_DESCRIPTORS`].
struct IndexedFile {
    name: &'static str,
    /// Its record in the set, tag and length included, so records
    /// concatenate into a valid `FileDescriptorSet`.
    start: usize,
    end: usize,
    /// Indices into [`FILES`].
    deps: &'static [u16],
}

// `FILES: &[IndexedFile]` (set order) and `TYPES: &[(&str, u16)]` (every
// message and enum full name with its file, sorted by name).
include!(concat!(env!("OUT_DIR"), "/descriptor_index.rs"));

static GLOBAL: Descriptors = Descriptors::new();

/// A lazily filled descriptor pool. The process uses one ([`message`],
/// [`load`], [`release`]); tests make their own to watch what gets loaded.
pub struct Descriptors {
    pool: Mutex<Option<DescriptorPool>>,
}

// === impl Descriptors ===

impl Descriptors {
    /// An empty pool.
    pub const fn new() -> Self {
        Descriptors {
            pool: Mutex::new(None),
        }
    }

    /// The descriptor of message `full_name`, loading its file (and that
    /// file's dependencies) if needed; `None` for a type neither
    /// envoy-types nor our hand-built files define.
    pub fn message(&self, full_name: &str) -> Option<MessageDescriptor> {
        self.load([full_name]).get_message_by_name(full_name)
    }

    /// Loads the files defining every type in `full_names` (messages or
    /// enums; unknown names are skipped) and returns the pool, which holds
    /// them all.
    pub fn load<'a>(&self, full_names: impl IntoIterator<Item = &'a str>) -> DescriptorPool {
        let mut slot = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let pool = slot.get_or_insert_with(DescriptorPool::new);
        let mut envoy = Vec::new();
        let mut extra: Vec<FileDescriptorProto> = Vec::new();
        for name in full_names {
            if pool.get_message_by_name(name).is_some() || pool.get_enum_by_name(name).is_some() {
                continue;
            }
            if let Some(file) = envoy_file_of(name) {
                closure(pool, file, &mut envoy);
            } else if let Some(file) = extra_file_of(name) {
                if extra.iter().all(|f| f.name != file.name) {
                    for dep in &file.dependency {
                        let i = FILES
                            .iter()
                            .position(|f| f.name == dep)
                            .expect("hand-built files import envoy-types' files");
                        closure(pool, i, &mut envoy);
                    }
                    extra.push(file);
                }
            }
        }
        if !envoy.is_empty() {
            let mut set = Vec::with_capacity(envoy.iter().map(|&i| file_len(i)).sum());
            for i in envoy {
                set.extend_from_slice(&ENVOY_DESCRIPTORS[FILES[i].start..FILES[i].end]);
            }
            pool.decode_file_descriptor_set(set.as_slice())
                .expect("envoy-types ships a valid descriptor set");
        }
        for file in extra {
            pool.add_file_descriptor_proto(file)
                .expect("hand-built descriptors are valid");
        }
        pool.clone()
    }

    /// The files loaded so far (nothing is loaded by this call).
    pub fn loaded(&self) -> DescriptorPool {
        let slot = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        slot.clone().unwrap_or_default()
    }

    /// Drops every loaded file; later lookups load again what they need.
    /// Handles taken before stay valid (they own their copy).
    pub fn release(&self) {
        let mut slot = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        *slot = None;
    }
}

impl Default for Descriptors {
    fn default() -> Self {
        Self::new()
    }
}

/// The file of [`FILES`] that defines `full_name`.
fn envoy_file_of(full_name: &str) -> Option<usize> {
    TYPES
        .binary_search_by(|(name, _)| (*name).cmp(full_name))
        .ok()
        .map(|i| usize::from(TYPES[i].1))
}

fn file_len(i: usize) -> usize {
    FILES[i].end - FILES[i].start
}

/// Appends to `order` file `file` and its dependencies that `pool` lacks,
/// dependencies first. A loaded file has all its dependencies loaded.
fn closure(pool: &DescriptorPool, file: usize, order: &mut Vec<usize>) {
    // Depth-first and iterative: dependency chains in the set are short,
    // but nothing bounds them.
    let mut stack = vec![(file, 0usize)];
    while let Some((f, next_dep)) = stack.pop() {
        if next_dep == 0 && (order.contains(&f) || pool.get_file_by_name(FILES[f].name).is_some()) {
            continue;
        }
        match FILES[f].deps.get(next_dep) {
            Some(&dep) => {
                stack.push((f, next_dep + 1));
                stack.push((usize::from(dep), 0));
            }
            None => order.push(f),
        }
    }
}

/// The descriptor of message `full_name` in the process's pool, loading
/// what it needs (see [`Descriptors::message`]).
pub fn message(full_name: &str) -> Option<MessageDescriptor> {
    GLOBAL.message(full_name)
}

/// Loads every type of `full_names` into the process's pool and returns it
/// (see [`Descriptors::load`]).
pub fn load<'a>(full_names: impl IntoIterator<Item = &'a str>) -> DescriptorPool {
    GLOBAL.load(full_names)
}

/// What the process's pool holds now (for tests and measurements).
pub fn loaded() -> DescriptorPool {
    GLOBAL.loaded()
}

/// Drops the process's pool: the proxy calls this once a configuration is
/// loaded, since the data path never needs descriptors. Later lookups load
/// again only what they need.
pub fn release() {
    GLOBAL.release()
}

/// Every file at once: envoy-types' whole set plus the hand-built files,
/// decoded afresh and not cached. For tests and tools that enumerate the
/// pool; the proxy never needs it.
pub fn full_pool() -> DescriptorPool {
    let mut pool = DescriptorPool::decode(ENVOY_DESCRIPTORS)
        .expect("envoy-types ships a valid descriptor set");
    for file in extra_files() {
        // As for a single lookup: a type envoy-types defines wins.
        if type_names(&file)
            .iter()
            .all(|n| pool.get_message_by_name(n).is_none())
        {
            pool.add_file_descriptor_proto(file)
                .expect("hand-built descriptors are valid");
        }
    }
    pool
}

/// The embedded descriptor set (for callers that want to drop its resident
/// pages after use).
pub fn embedded_bytes() -> &'static [u8] {
    ENVOY_DESCRIPTORS
}

/// The number of files in envoy-types' set (the hand-built ones excluded).
pub fn envoy_file_count() -> usize {
    FILES.len()
}

/// Our hand-built files: `TypedStruct` (both spellings, absent from
/// envoy-types' set) and Istio's filter configurations.
fn extra_files() -> Vec<FileDescriptorProto> {
    let mut files = vec![
        typed_struct_file("udpa/type/v1/typed_struct.proto", "udpa.type.v1"),
        typed_struct_file("xds/type/v3/typed_struct.proto", "xds.type.v3"),
    ];
    files.extend(istio_files());
    files.push(ip_matcher_file());
    files.push(istio_workload_file());
    files
}

/// `xds.type.matcher.v3.IPMatcher` (cncf/xds `xds/type/matcher/v3/ip.proto`),
/// the custom matcher tree of a listener's `filter_chain_matcher` that
/// envoy-types does not generate.
pub const XDS_IP_MATCHER: &str = "xds.type.matcher.v3.IPMatcher";

fn ip_matcher_file() -> FileDescriptorProto {
    let range_matcher = message_proto(
        "IPRangeMatcher",
        vec![
            repeated(message_field("ranges", 1, ".xds.core.v3.CidrRange")),
            message_field("on_match", 2, ".xds.type.matcher.v3.Matcher.OnMatch"),
            field("exclusive", 3, Type::Bool),
        ],
    );
    let mut ip_matcher = message_proto(
        "IPMatcher",
        vec![repeated(message_field(
            "range_matchers",
            1,
            ".xds.type.matcher.v3.IPMatcher.IPRangeMatcher",
        ))],
    );
    ip_matcher.nested_type = vec![range_matcher];
    proto3_file(
        "xds/type/matcher/v3/ip.proto",
        "xds.type.matcher.v3",
        &[
            "xds/core/v3/cidr.proto",
            "xds/type/matcher/v3/matcher.proto",
        ],
        vec![ip_matcher],
        vec![],
    )
}

/// The hand-built file defining message or enum `full_name`. Built on
/// demand: only a name missing from envoy-types' set gets here.
fn extra_file_of(full_name: &str) -> Option<FileDescriptorProto> {
    extra_files()
        .into_iter()
        .find(|f| type_names(f).iter().any(|n| n == full_name))
}

/// The full names of the messages and enums of `file`, nested ones included.
fn type_names(file: &FileDescriptorProto) -> Vec<String> {
    let mut names = Vec::new();
    let package = file.package();
    for m in &file.message_type {
        message_type_names(m, package, &mut names);
    }
    names.extend(
        file.enum_type
            .iter()
            .map(|e| format!("{package}.{}", e.name())),
    );
    names
}

fn message_type_names(m: &DescriptorProto, scope: &str, out: &mut Vec<String>) {
    let full = format!("{scope}.{}", m.name());
    for nested in &m.nested_type {
        message_type_names(nested, &full, out);
    }
    out.extend(m.enum_type.iter().map(|e| format!("{full}.{}", e.name())));
    out.push(full);
}

/// `udpa.type.v1.TypedStruct`: the legacy spelling of `xds.type.v3.TypedStruct`.
/// Neither is in envoy-types' descriptor set, so both are built here.
pub const UDPA_TYPED_STRUCT: &str = "udpa.type.v1.TypedStruct";
/// `xds.type.v3.TypedStruct`.
pub const XDS_TYPED_STRUCT: &str = "xds.type.v3.TypedStruct";

fn typed_struct_file(file: &str, package: &str) -> FileDescriptorProto {
    proto3_file(
        file,
        package,
        &["google/protobuf/struct.proto"],
        vec![message_proto(
            "TypedStruct",
            vec![
                field("type_url", 1, Type::String),
                message_field("value", 2, ".google.protobuf.Struct"),
            ],
        )],
        vec![],
    )
}

/// `stats.PluginConfig`: Istio's `istio.stats` filter (HTTP and network).
pub const ISTIO_STATS: &str = "stats.PluginConfig";
/// `io.istio.http.peer_metadata.Config`: Istio's peer metadata HTTP filter.
pub const ISTIO_PEER_METADATA: &str = "io.istio.http.peer_metadata.Config";
/// `envoy.tcp.metadataexchange.config.MetadataExchange`: Istio's network
/// `istio.metadata_exchange` filter.
pub const ISTIO_METADATA_EXCHANGE: &str = "envoy.tcp.metadataexchange.config.MetadataExchange";
/// `istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`: `istio.alpn`.
pub const ISTIO_ALPN: &str = "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig";

/// The Istio filter configuration messages the pool knows.
pub const ISTIO_TYPES: [&str; 4] = [
    ISTIO_STATS,
    ISTIO_PEER_METADATA,
    ISTIO_METADATA_EXCHANGE,
    ISTIO_ALPN,
];

/// One hand-built file per Istio package (the order of [`ISTIO_TYPES`]).
fn istio_files() -> [FileDescriptorProto; 4] {
    [
        istio_stats_file(),
        peer_metadata_file(),
        metadata_exchange_file(),
        alpn_file(),
    ]
}

/// istio/proxy `source/extensions/filters/http/istio_stats/config.proto`.
fn istio_stats_file() -> FileDescriptorProto {
    let mut dimensions = message_proto(
        "DimensionsEntry",
        vec![
            field("key", 1, Type::String),
            field("value", 2, Type::String),
        ],
    );
    dimensions.options = Some(MessageOptions {
        map_entry: Some(true),
        ..Default::default()
    });
    let mut metric_config = message_proto(
        "MetricConfig",
        vec![
            repeated(message_field(
                "dimensions",
                1,
                ".stats.MetricConfig.DimensionsEntry",
            )),
            field("name", 2, Type::String),
            repeated(field("tags_to_remove", 3, Type::String)),
            field("match", 4, Type::String),
            field("drop", 5, Type::Bool),
        ],
    );
    metric_config.nested_type = vec![dimensions];
    let metric_definition = message_proto(
        "MetricDefinition",
        vec![
            field("name", 1, Type::String),
            field("value", 2, Type::String),
            enum_field("type", 3, ".stats.MetricType"),
        ],
    );
    let mut plugin_config = message_proto(
        "PluginConfig",
        vec![
            field("disable_host_header_fallback", 6, Type::Bool),
            message_field("tcp_reporting_duration", 7, ".google.protobuf.Duration"),
            repeated(message_field("metrics", 8, ".stats.MetricConfig")),
            repeated(message_field("definitions", 9, ".stats.MetricDefinition")),
            enum_field("reporter", 10, ".stats.Reporter"),
            message_field("rotation_interval", 11, ".google.protobuf.Duration"),
            message_field(
                "graceful_deletion_interval",
                12,
                ".google.protobuf.Duration",
            ),
        ],
    );
    // Fields 1-5 (debug, max_peer_cache_size, stat_prefix, field_separator,
    // value_separator) are reserved.
    plugin_config.reserved_range = vec![ReservedRange {
        start: Some(1),
        end: Some(6),
    }];
    plugin_config.reserved_name = [
        "debug",
        "max_peer_cache_size",
        "stat_prefix",
        "field_separator",
        "value_separator",
    ]
    .map(String::from)
    .to_vec();
    proto3_file(
        "source/extensions/filters/http/istio_stats/config.proto",
        "stats",
        &["google/protobuf/duration.proto"],
        vec![metric_config, metric_definition, plugin_config],
        vec![
            enumeration(
                "MetricType",
                &[("COUNTER", 0), ("GAUGE", 1), ("HISTOGRAM", 2)],
            ),
            enumeration("Reporter", &[("UNSPECIFIED", 0), ("SERVER_GATEWAY", 1)]),
        ],
    )
}

/// istio/proxy `source/extensions/filters/http/peer_metadata/config.proto`.
fn peer_metadata_file() -> FileDescriptorProto {
    const P: &str = ".io.istio.http.peer_metadata.Config";
    let nested = |name: &str| format!("{P}.{name}");
    let mut discovery = message_proto(
        "DiscoveryMethod",
        vec![
            in_oneof(message_field("baggage", 1, &nested("Baggage")), 0),
            in_oneof(
                message_field("workload_discovery", 2, &nested("WorkloadDiscovery")),
                0,
            ),
            in_oneof(
                message_field("istio_headers", 3, &nested("IstioHeaders")),
                0,
            ),
            in_oneof(
                message_field("upstream_filter_state", 4, &nested("UpstreamFilterState")),
                0,
            ),
        ],
    );
    discovery.oneof_decl = vec![oneof("method_specifier")];
    let mut propagation = message_proto(
        "PropagationMethod",
        vec![
            in_oneof(
                message_field("istio_headers", 1, &nested("IstioHeaders")),
                0,
            ),
            in_oneof(message_field("baggage", 2, &nested("Baggage")), 0),
        ],
    );
    propagation.oneof_decl = vec![oneof("method_specifier")];
    let mut config = message_proto(
        "Config",
        vec![
            repeated(message_field(
                "downstream_discovery",
                1,
                &nested("DiscoveryMethod"),
            )),
            repeated(message_field(
                "upstream_discovery",
                2,
                &nested("DiscoveryMethod"),
            )),
            repeated(message_field(
                "downstream_propagation",
                3,
                &nested("PropagationMethod"),
            )),
            repeated(message_field(
                "upstream_propagation",
                4,
                &nested("PropagationMethod"),
            )),
            field("shared_with_upstream", 5, Type::Bool),
            repeated(field("additional_labels", 6, Type::String)),
        ],
    );
    config.nested_type = vec![
        message_proto("Baggage", vec![]),
        message_proto("WorkloadDiscovery", vec![]),
        message_proto(
            "IstioHeaders",
            vec![field("skip_external_clusters", 1, Type::Bool)],
        ),
        message_proto(
            "UpstreamFilterState",
            vec![field("peer_metadata_key", 1, Type::String)],
        ),
        discovery,
        propagation,
    ];
    proto3_file(
        "source/extensions/filters/http/peer_metadata/config.proto",
        "io.istio.http.peer_metadata",
        &[],
        vec![config],
        vec![],
    )
}

/// istio/proxy `source/extensions/filters/network/metadata_exchange/config/metadata_exchange.proto`.
fn metadata_exchange_file() -> FileDescriptorProto {
    proto3_file(
        "source/extensions/filters/network/metadata_exchange/config/metadata_exchange.proto",
        "envoy.tcp.metadataexchange.config",
        &[],
        vec![message_proto(
            "MetadataExchange",
            vec![
                field("protocol", 1, Type::String),
                field("enable_discovery", 2, Type::Bool),
                repeated(field("additional_labels", 3, Type::String)),
            ],
        )],
        vec![],
    )
}

/// istio/proxy `source/extensions/filters/http/alpn/config.proto`.
fn alpn_file() -> FileDescriptorProto {
    const P: &str = ".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig";
    let mut config = message_proto(
        "FilterConfig",
        vec![repeated(message_field(
            "alpn_override",
            1,
            &format!("{P}.AlpnOverride"),
        ))],
    );
    config.nested_type = vec![message_proto(
        "AlpnOverride",
        vec![
            enum_field("upstream_protocol", 1, &format!("{P}.Protocol")),
            repeated(field("alpn_override", 2, Type::String)),
        ],
    )];
    config.enum_type = vec![enumeration(
        "Protocol",
        &[("HTTP10", 0), ("HTTP11", 1), ("HTTP2", 2)],
    )];
    proto3_file(
        "source/extensions/filters/http/alpn/config.proto",
        "istio.envoy.config.filter.http.alpn.v2alpha1",
        &[],
        vec![config],
        vec![],
    )
}

/// `istio.workload.BootstrapExtension`: the `metadata_discovery` bootstrap
/// extension (WDS over a config source) of an ambient proxy's bootstrap.
pub const ISTIO_WORKLOAD_EXTENSION: &str = "istio.workload.BootstrapExtension";
/// `istio.workload.Workload`: the WDS resource (type URL
/// `type.googleapis.com/istio.workload.Workload`).
pub const ISTIO_WORKLOAD: &str = "istio.workload.Workload";

/// istio/proxy `source/extensions/common/workload_discovery/extension.proto`
/// and the part of `discovery.proto` (itself ztunnel's `workload.proto`)
/// that peer metadata reads: `Workload` with the fields weir uses (the
/// others are unknown fields to this descriptor: skipped when decoding,
/// as a proxy built from an older schema does), `Locality` and
/// `WorkloadType`. Numbers and names as upstream.
fn istio_workload_file() -> FileDescriptorProto {
    const P: &str = ".istio.workload";
    let extension = message_proto(
        "BootstrapExtension",
        vec![message_field(
            "config_source",
            1,
            ".envoy.config.core.v3.ConfigSource",
        )],
    );
    let workload = message_proto(
        "Workload",
        vec![
            field("uid", 20, Type::String),
            field("name", 1, Type::String),
            field("namespace", 2, Type::String),
            repeated(field("addresses", 3, Type::Bytes)),
            field("network", 4, Type::String),
            field("trust_domain", 6, Type::String),
            field("service_account", 7, Type::String),
            field("canonical_name", 10, Type::String),
            field("canonical_revision", 11, Type::String),
            enum_field("workload_type", 12, &format!("{P}.WorkloadType")),
            field("workload_name", 13, Type::String),
            field("cluster_id", 18, Type::String),
            message_field("locality", 24, &format!("{P}.Locality")),
        ],
    );
    let locality = message_proto(
        "Locality",
        vec![
            field("region", 1, Type::String),
            field("zone", 2, Type::String),
            field("subzone", 3, Type::String),
        ],
    );
    proto3_file(
        "source/extensions/common/workload_discovery/discovery.proto",
        "istio.workload",
        &["envoy/config/core/v3/config_source.proto"],
        vec![extension, workload, locality],
        vec![enumeration(
            "WorkloadType",
            &[("DEPLOYMENT", 0), ("CRONJOB", 1), ("POD", 2), ("JOB", 3)],
        )],
    )
}

// === descriptor building blocks ===

fn proto3_file(
    name: &str,
    package: &str,
    deps: &[&str],
    messages: Vec<DescriptorProto>,
    enums: Vec<EnumDescriptorProto>,
) -> FileDescriptorProto {
    FileDescriptorProto {
        name: Some(name.into()),
        package: Some(package.into()),
        dependency: deps.iter().map(|d| (*d).to_owned()).collect(),
        message_type: messages,
        enum_type: enums,
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

fn message_proto(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
    DescriptorProto {
        name: Some(name.into()),
        field: fields,
        ..Default::default()
    }
}

/// A singular scalar field.
fn field(name: &str, number: i32, ty: Type) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(ty as i32),
        json_name: Some(to_json_name(name)),
        ..Default::default()
    }
}

/// A singular message field of type `type_name` (fully qualified, leading dot).
fn message_field(name: &str, number: i32, type_name: &str) -> FieldDescriptorProto {
    FieldDescriptorProto {
        type_name: Some(type_name.into()),
        ..field(name, number, Type::Message)
    }
}

fn enum_field(name: &str, number: i32, type_name: &str) -> FieldDescriptorProto {
    FieldDescriptorProto {
        type_name: Some(type_name.into()),
        ..field(name, number, Type::Enum)
    }
}

fn repeated(f: FieldDescriptorProto) -> FieldDescriptorProto {
    FieldDescriptorProto {
        label: Some(Label::Repeated as i32),
        ..f
    }
}

fn in_oneof(f: FieldDescriptorProto, index: i32) -> FieldDescriptorProto {
    FieldDescriptorProto {
        oneof_index: Some(index),
        ..f
    }
}

fn oneof(name: &str) -> OneofDescriptorProto {
    OneofDescriptorProto {
        name: Some(name.into()),
        ..Default::default()
    }
}

fn enumeration(name: &str, values: &[(&str, i32)]) -> EnumDescriptorProto {
    EnumDescriptorProto {
        name: Some(name.into()),
        value: values
            .iter()
            .map(|(n, v)| EnumValueDescriptorProto {
                name: Some((*n).into()),
                number: Some(*v),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn to_json_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Decodes `Any` bytes of a known type into a `DynamicMessage` (loading
/// the type if needed).
pub fn decode_any(type_url: &str, value: &[u8]) -> Result<DynamicMessage, String> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let desc = message(name).ok_or_else(|| format!("unknown type URL {type_url:?}"))?;
    DynamicMessage::decode(desc, value).map_err(|e| format!("invalid {name}: {e}"))
}

/// `m` as a `DynamicMessage` whose pool also holds the type of every `Any`
/// inside it, at any depth, so that it serialises to JSON with those values
/// expanded (as with the whole pool). `None` when `m` does not decode as
/// its own type (never for a valid prost message).
pub fn dynamic_message<M: Message + prost::Name>(m: &M) -> Option<DynamicMessage> {
    let name = M::full_name();
    let bytes = m.encode_to_vec();
    let first = DynamicMessage::decode(message(&name)?, bytes.as_slice()).ok()?;
    let mut names = vec![name.clone()];
    any_types(&first, &mut names);
    names.sort_unstable();
    names.dedup();
    let desc = load(names.iter().map(String::as_str)).get_message_by_name(&name)?;
    DynamicMessage::decode(desc, bytes.as_slice()).ok()
}

/// Appends the type of every `Any` in `msg`, those inside `Any`s included.
fn any_types(msg: &DynamicMessage, out: &mut Vec<String>) {
    if msg.descriptor().full_name() == "google.protobuf.Any" {
        let field = |name: &str| msg.get_field_by_name(name);
        let url = field("type_url").and_then(|v| v.as_str().map(str::to_owned));
        let value = field("value").and_then(|v| v.as_bytes().cloned());
        if let (Some(url), Some(value)) = (url, value) {
            // Decoding loads the type; an unknown or undecodable one is
            // left to the serialiser to report.
            if let Ok(inner) = decode_any(&url, &value) {
                out.push(inner.descriptor().full_name().to_owned());
                any_types(&inner, out);
            }
        }
        return;
    }
    for (_, value) in msg.fields() {
        any_types_in(value, out);
    }
}

fn any_types_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Message(m) => any_types(m, out),
        Value::List(items) => items.iter().for_each(|v| any_types_in(v, out)),
        Value::Map(map) => map.values().for_each(|v| any_types_in(v, out)),
        _ => {}
    }
}

/// Encodes a prost message (helper for tests and config dumps).
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTENER: &str = "envoy.config.listener.v3.Listener";
    const HCM: &str =
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";

    /// What an xDS workload decodes: the resources and the extensions in them.
    const XDS_WORKLOAD: [&str; 11] = [
        LISTENER,
        "envoy.config.cluster.v3.Cluster",
        "envoy.config.route.v3.RouteConfiguration",
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        HCM,
        ROUTER,
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    ];

    fn file_count(d: &Descriptors) -> usize {
        d.loaded().files().len()
    }

    #[test]
    fn pool_has_envoy_and_typed_structs() {
        assert!(message("envoy.config.bootstrap.v3.Bootstrap").is_some());
        assert!(message(HCM).is_some());
        assert!(message(UDPA_TYPED_STRUCT).is_some());
        assert!(message(XDS_TYPED_STRUCT).is_some());
    }

    #[test]
    fn istio_messages_have_istios_layout() {
        let fields = |m: &str| -> Vec<(String, u32, bool)> {
            message(m)
                .unwrap_or_else(|| panic!("{m} is in the pool"))
                .fields()
                .map(|f| (f.name().to_owned(), f.number(), f.is_list()))
                .collect()
        };
        let own = |v: &[(&str, u32, bool)]| -> Vec<(String, u32, bool)> {
            v.iter()
                .map(|(n, i, l)| ((*n).to_owned(), *i, *l))
                .collect()
        };
        assert_eq!(
            fields(ISTIO_STATS),
            own(&[
                ("disable_host_header_fallback", 6, false),
                ("tcp_reporting_duration", 7, false),
                ("metrics", 8, true),
                ("definitions", 9, true),
                ("reporter", 10, false),
                ("rotation_interval", 11, false),
                ("graceful_deletion_interval", 12, false),
            ])
        );
        let dims = message("stats.MetricConfig")
            .and_then(|m| m.get_field_by_name("dimensions"))
            .expect("dimensions");
        assert!(dims.is_map());
        assert_eq!(
            fields(ISTIO_PEER_METADATA),
            own(&[
                ("downstream_discovery", 1, true),
                ("upstream_discovery", 2, true),
                ("downstream_propagation", 3, true),
                ("upstream_propagation", 4, true),
                ("shared_with_upstream", 5, false),
                ("additional_labels", 6, true),
            ])
        );
        assert_eq!(
            fields("io.istio.http.peer_metadata.Config.DiscoveryMethod"),
            own(&[
                ("baggage", 1, false),
                ("workload_discovery", 2, false),
                ("istio_headers", 3, false),
                ("upstream_filter_state", 4, false),
            ])
        );
        assert_eq!(
            fields(ISTIO_METADATA_EXCHANGE),
            own(&[
                ("protocol", 1, false),
                ("enable_discovery", 2, false),
                ("additional_labels", 3, true),
            ])
        );
        assert_eq!(fields(ISTIO_ALPN), own(&[("alpn_override", 1, true)]));
        assert_eq!(
            fields("istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride"),
            own(&[("upstream_protocol", 1, false), ("alpn_override", 2, true)])
        );
    }

    /// build.rs's index agrees with the decoded set: the same files in the
    /// same order with the same dependencies, and every message and enum
    /// mapped to the file that defines it.
    #[test]
    fn index_matches_the_whole_set() {
        let full = full_pool();
        let files: Vec<(String, Vec<String>)> = full
            .files()
            .take(FILES.len())
            .map(|f| {
                let deps = f.dependencies().map(|d| d.name().to_owned()).collect();
                (f.name().to_owned(), deps)
            })
            .collect();
        let indexed: Vec<(String, Vec<String>)> = FILES
            .iter()
            .map(|f| {
                let deps = f
                    .deps
                    .iter()
                    .map(|&d| FILES[usize::from(d)].name.to_owned());
                (f.name.to_owned(), deps.collect())
            })
            .collect();
        assert_eq!(files, indexed);
        let mut types: Vec<(String, usize)> = full
            .all_messages()
            .map(|m| (m.full_name().to_owned(), m.parent_file().index()))
            .chain(
                full.all_enums()
                    .map(|e| (e.full_name().to_owned(), e.parent_file().index())),
            )
            .filter(|(_, file)| *file < FILES.len())
            .collect();
        types.sort_unstable();
        let indexed: Vec<(String, usize)> = TYPES
            .iter()
            .map(|(n, f)| ((*n).to_owned(), usize::from(*f)))
            .collect();
        assert_eq!(types, indexed);
    }

    #[test]
    fn a_listener_loads_only_its_closure() {
        let d = Descriptors::new();
        assert_eq!(file_count(&d), 0);
        assert!(d.message(LISTENER).is_some());
        let n = file_count(&d);
        assert!(n > 1 && n < FILES.len() / 4, "{n} of {} files", FILES.len());
        // The types of its Any fields are not dependencies.
        assert!(d.loaded().get_message_by_name(HCM).is_none());
        assert!(d.message(HCM).is_some());
        assert!(file_count(&d) > n);
        assert!(d.loaded().get_message_by_name(LISTENER).is_some());
    }

    #[test]
    fn an_xds_workload_loads_a_small_part_of_the_set() {
        let d = Descriptors::new();
        let pool = d.load(XDS_WORKLOAD);
        for name in XDS_WORKLOAD {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
        let n = pool.files().len();
        assert!(n < FILES.len() / 3, "{n} of {} files", FILES.len());
    }

    #[test]
    fn hand_built_files_load_on_demand() {
        let d = Descriptors::new();
        // A nested message of a hand-built file loads the file.
        assert!(d.message("stats.MetricConfig").is_some());
        assert!(d.loaded().get_message_by_name(ISTIO_STATS).is_some());
        assert!(d.loaded().get_message_by_name(ISTIO_ALPN).is_none());
        assert!(d.message(XDS_TYPED_STRUCT).is_some());
        // With its dependency, and next to envoy-types' file of its package.
        assert!(d
            .loaded()
            .get_message_by_name("google.protobuf.Struct")
            .is_some());
        assert!(d.message("xds.type.v3.CelExpression").is_some());
    }

    #[test]
    fn unknown_types_load_nothing_and_keep_their_errors() {
        let d = Descriptors::new();
        assert!(d.message("foo.Bar").is_none());
        assert!(d.message("envoy.config.listener.v3").is_none(), "a package");
        assert_eq!(file_count(&d), 0);
        assert_eq!(
            decode_any("type.googleapis.com/foo.Bar", &[]).expect_err("unknown"),
            r#"unknown type URL "type.googleapis.com/foo.Bar""#
        );
    }

    #[test]
    fn release_then_reuse() {
        let d = Descriptors::new();
        let listener = d.message(LISTENER).expect("listener");
        d.release();
        assert_eq!(file_count(&d), 0);
        // Descriptors taken before stay usable: they own their pool.
        assert!(listener.get_field_by_name("filter_chains").is_some());
        assert!(d.message(LISTENER).is_some());
        assert!(file_count(&d) > 1);
        // The process's pool too.
        release();
        assert!(message(LISTENER).is_some());
    }

    #[test]
    fn concurrent_loads_all_land() {
        let d = Descriptors::new();
        std::thread::scope(|s| {
            for name in XDS_WORKLOAD {
                let d = &d;
                s.spawn(move || assert!(d.message(name).is_some(), "{name}"));
            }
            s.spawn(|| d.release());
        });
        // Whatever the interleaving with the release, every lookup found its
        // type, and a pool loaded afterwards has them all.
        let pool = d.load(XDS_WORKLOAD);
        for name in XDS_WORKLOAD {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
    }

    /// A message serialises with its Any values expanded, the types of
    /// which are loaded on the way (as `/config_dump` needs).
    #[test]
    fn dynamic_message_expands_nested_anys() {
        use crate::api::envoy::config::listener::v3::Listener;
        let any = crate::bootstrap::any_from_text(
            &format!("type.googleapis.com/{LISTENER}"),
            r#"
name: l
filter_chains:
- filters:
  - name: hcm
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: s
      http_filters:
      - name: buffer
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
          max_request_bytes: 1024
"#,
        )
        .expect("parses");
        let listener = Listener::decode(any.value.as_slice()).expect("decodes");
        let dm = dynamic_message(&listener).expect("known type");
        let json = serde_json::to_value(&dm).expect("serialises");
        let hcm = &json["filterChains"][0]["filters"][0]["typedConfig"];
        assert_eq!(hcm["statPrefix"], "s", "{json}");
        let buffer = &hcm["httpFilters"][0]["typedConfig"];
        assert_eq!(buffer["maxRequestBytes"], 1024, "{json}");
    }
}
