//! The protobuf descriptor pool used for Envoy's YAML/JSON mapping.
//!
//! `envoy-types` ships a `FileDescriptorSet` of every Envoy, xds and udpa
//! proto it generates; we add the few messages it lacks as hand-built
//! `FileDescriptorProto`s so no system `protoc` is needed: `TypedStruct`
//! (both spellings) and the configuration messages of Istio's own filters
//! that istiod sends (see [`ISTIO_TYPES`]). The Istio layouts (names,
//! numbers, types) follow istio/proxy's `.proto` files as of its last
//! release before the filters moved into Envoy.
use std::sync::Mutex;

use prost::Message;
use prost_reflect::DescriptorPool;
use prost_types::{
    descriptor_proto::ReservedRange,
    field_descriptor_proto::{Label, Type},
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto, MessageOptions, OneofDescriptorProto,
};

static ENVOY_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

static POOL: Mutex<Option<DescriptorPool>> = Mutex::new(None);

/// The pool: Envoy's descriptors plus our own additions. Built on first use
/// and kept until [`release`]; a `DescriptorPool` is a cheap handle.
pub fn pool() -> DescriptorPool {
    let mut slot = POOL.lock().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert_with(build).clone()
}

/// The embedded descriptor set (for callers that want to drop its resident
/// pages after use).
pub fn embedded_bytes() -> &'static [u8] {
    ENVOY_DESCRIPTORS
}

/// Drops the cached pool (tens of MiB decoded): the proxy calls this once a
/// configuration is loaded, since the data path never needs descriptors.
/// The next [`pool`] call builds it again.
pub fn release() {
    let mut slot = POOL.lock().unwrap_or_else(|p| p.into_inner());
    *slot = None;
}

fn build() -> DescriptorPool {
    {
        let mut pool = DescriptorPool::decode(ENVOY_DESCRIPTORS)
            .expect("envoy-types ships a valid descriptor set");
        for (name, file, package) in [
            (
                UDPA_TYPED_STRUCT,
                "udpa/type/v1/typed_struct.proto",
                "udpa.type.v1",
            ),
            (
                XDS_TYPED_STRUCT,
                "xds/type/v3/typed_struct.proto",
                "xds.type.v3",
            ),
        ] {
            if pool.get_message_by_name(name).is_none() {
                pool.add_file_descriptor_proto(typed_struct_file(file, package))
                    .expect("TypedStruct descriptor is valid");
            }
        }
        for (name, file) in istio_files() {
            if pool.get_message_by_name(name).is_none() {
                pool.add_file_descriptor_proto(file)
                    .expect("Istio descriptors are valid");
            }
        }
        pool
    }
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
        vec![message(
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

/// One hand-built file per Istio package, keyed by its main message.
fn istio_files() -> [(&'static str, FileDescriptorProto); 4] {
    [
        (ISTIO_STATS, istio_stats_file()),
        (ISTIO_PEER_METADATA, peer_metadata_file()),
        (ISTIO_METADATA_EXCHANGE, metadata_exchange_file()),
        (ISTIO_ALPN, alpn_file()),
    ]
}

/// istio/proxy `source/extensions/filters/http/istio_stats/config.proto`.
fn istio_stats_file() -> FileDescriptorProto {
    let mut dimensions = message(
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
    let mut metric_config = message(
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
    let metric_definition = message(
        "MetricDefinition",
        vec![
            field("name", 1, Type::String),
            field("value", 2, Type::String),
            enum_field("type", 3, ".stats.MetricType"),
        ],
    );
    let mut plugin_config = message(
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
    let mut discovery = message(
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
    let mut propagation = message(
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
    let mut config = message(
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
        message("Baggage", vec![]),
        message("WorkloadDiscovery", vec![]),
        message(
            "IstioHeaders",
            vec![field("skip_external_clusters", 1, Type::Bool)],
        ),
        message(
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
        vec![message(
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
    let mut config = message(
        "FilterConfig",
        vec![repeated(message_field(
            "alpn_override",
            1,
            &format!("{P}.AlpnOverride"),
        ))],
    );
    config.nested_type = vec![message(
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

fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
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

/// Decodes `Any` bytes of a known type into a `DynamicMessage`.
pub fn decode_any(type_url: &str, value: &[u8]) -> Result<prost_reflect::DynamicMessage, String> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let desc = pool()
        .get_message_by_name(name)
        .ok_or_else(|| format!("unknown type URL {type_url:?}"))?;
    prost_reflect::DynamicMessage::decode(desc, value).map_err(|e| format!("invalid {name}: {e}"))
}

/// Encodes a prost message (helper for tests and config dumps).
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_has_envoy_and_typed_structs() {
        let p = pool();
        assert!(p
            .get_message_by_name("envoy.config.bootstrap.v3.Bootstrap")
            .is_some());
        assert!(p
            .get_message_by_name(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
            )
            .is_some());
        assert!(p.get_message_by_name(UDPA_TYPED_STRUCT).is_some());
        assert!(p.get_message_by_name(XDS_TYPED_STRUCT).is_some());
    }

    #[test]
    fn istio_messages_have_istios_layout() {
        let p = pool();
        let fields = |m: &str| -> Vec<(String, u32, bool)> {
            p.get_message_by_name(m)
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
        let dims = p
            .get_message_by_name("stats.MetricConfig")
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
}
