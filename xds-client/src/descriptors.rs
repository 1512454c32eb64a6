//! The protobuf descriptor pool used for Envoy's YAML/JSON mapping.
//!
//! `envoy-types` ships a `FileDescriptorSet` of every Envoy, xds and udpa
//! proto it generates; we add the few messages it lacks (today only
//! `udpa.type.v1.TypedStruct`) as hand-built `FileDescriptorProto`s so no
//! system `protoc` is needed.
use std::sync::Mutex;

use prost::Message;
use prost_reflect::DescriptorPool;
use prost_types::{
    field_descriptor_proto::{Label, Type},
    DescriptorProto, FieldDescriptorProto, FileDescriptorProto,
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
        pool
    }
}

/// `udpa.type.v1.TypedStruct`: the legacy spelling of `xds.type.v3.TypedStruct`.
/// Neither is in envoy-types' descriptor set, so both are built here.
pub const UDPA_TYPED_STRUCT: &str = "udpa.type.v1.TypedStruct";
/// `xds.type.v3.TypedStruct`.
pub const XDS_TYPED_STRUCT: &str = "xds.type.v3.TypedStruct";

fn typed_struct_file(file: &str, package: &str) -> FileDescriptorProto {
    let field = |name: &str, number: i32, ty: Type, type_name: Option<&str>| FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(ty as i32),
        type_name: type_name.map(str::to_owned),
        json_name: Some(to_json_name(name)),
        ..Default::default()
    };
    FileDescriptorProto {
        name: Some(file.into()),
        package: Some(package.into()),
        dependency: vec!["google/protobuf/struct.proto".into()],
        message_type: vec![DescriptorProto {
            name: Some("TypedStruct".into()),
            field: vec![
                field("type_url", 1, Type::String, None),
                field("value", 2, Type::Message, Some(".google.protobuf.Struct")),
            ],
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
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
}
