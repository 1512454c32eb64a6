//! The input framing the xDS fuzz targets share: frames of
//! `len_hi, len_lo, len bytes` (a length past the input takes what is
//! left), and a delta response's changes as the client applies them.
//! Included by path (`#[path]`): each fuzz target is its own binary.
use prost::Message;
use xds_client::api::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use xds_client::api::google::protobuf::Any;

/// Frames per input.
pub const MAX_FRAMES: usize = 8;
/// Resources (and removed names) taken from one response.
pub const MAX_RESOURCES: usize = 64;

/// What `DynamicState::apply` takes: (name, resource, version) each.
pub type Resources = Vec<(Option<String>, Any, String)>;

/// The next frame's body, advancing `rest`; `None` once fewer than two
/// bytes are left.
pub fn next_frame<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let [hi, lo, tail @ ..] = *rest else {
        return None;
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
    let (body, next) = tail.split_at(len);
    *rest = next;
    Some(body)
}

/// A `DeltaDiscoveryResponse`'s resources and removed names, as the
/// client applies them (a resource without a body is skipped); `None`
/// when `body` does not decode.
pub fn delta_changes(body: &[u8]) -> Option<(Resources, Vec<String>)> {
    let resp = DeltaDiscoveryResponse::decode(body).ok()?;
    let resources = resp
        .resources
        .iter()
        .take(MAX_RESOURCES)
        .filter_map(|r| {
            let a = r.resource.as_ref()?;
            Some((Some(r.name.clone()), a.clone(), r.version.clone()))
        })
        .collect();
    let removed = resp
        .removed_resources
        .iter()
        .take(MAX_RESOURCES)
        .cloned()
        .collect();
    Some((resources, removed))
}
