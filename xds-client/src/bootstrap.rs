//! Envoy bootstrap parsing: YAML or JSON text -> `Bootstrap` proto, with
//! Envoy's proto-JSON mapping and leniencies.
//!
//! Steps: text -> `serde_json::Value` -> [`normalize`] against the message
//! descriptors (unknown fields with their path, `TypedStruct` unwrapped into
//! the typed message, a single object accepted where a list is expected) ->
//! `prost-reflect` deserialisation (camelCase and snake_case names, durations,
//! wrappers, `@type` Any values) -> transcode into the `envoy-types` struct.
use prost::Message;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor};
use serde_json::{Map, Value};

use crate::api::envoy::config::bootstrap::v3::Bootstrap;
use crate::descriptors::{self, UDPA_TYPED_STRUCT, XDS_TYPED_STRUCT};
use crate::error::{join, ConfigErrors};

/// How strict parsing is about fields the proto does not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// `--allow-unknown-static-fields`: drop unknown fields instead of failing.
    pub allow_unknown_fields: bool,
}

/// Parses YAML (a superset of JSON) into a `Bootstrap`.
pub fn parse_bootstrap(text: &str, opts: ParseOptions) -> Result<Bootstrap, ConfigErrors> {
    match parse_bootstrap_collect(text, opts) {
        (Some(b), errs) if errs.is_empty() => Ok(b),
        (_, errs) => Err(errs),
    }
}

/// Parses as far as possible: the bootstrap (unknown fields dropped) when
/// it deserialises, and every error found on the way.
pub fn parse_bootstrap_collect(
    text: &str,
    opts: ParseOptions,
) -> (Option<Bootstrap>, ConfigErrors) {
    let value = match text_to_json(text) {
        Ok(v) => v,
        Err(e) => return (None, e),
    };
    let desc = descriptors::message("envoy.config.bootstrap.v3.Bootstrap")
        .expect("descriptor pool has Bootstrap");
    let (dynamic, mut errs) = json_to_message_collect(value, &desc, opts);
    let Some(dynamic) = dynamic else {
        return (None, errs);
    };
    match dynamic.transcode_to::<Bootstrap>() {
        Ok(b) => (Some(b), errs),
        Err(e) => {
            errs.push("", format!("bootstrap does not transcode: {e}"));
            (None, errs)
        }
    }
}

/// Parses one xDS resource written as YAML or JSON (Envoy's proto-JSON
/// mapping, as in a bootstrap) into an `Any` of `type_url`
/// (`type.googleapis.com/envoy.config.listener.v3.Listener`, ...). Test
/// control planes and filesystem xDS use it.
pub fn any_from_text(
    type_url: &str,
    text: &str,
) -> Result<crate::api::google::protobuf::Any, ConfigErrors> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let Some(desc) = descriptors::message(name) else {
        let mut errs = ConfigErrors::default();
        errs.push("", format!("unknown resource type {type_url:?}"));
        return Err(errs);
    };
    let value = text_to_json(text)?;
    let msg = json_to_message(value, &desc, ParseOptions::default())?;
    Ok(crate::api::google::protobuf::Any {
        type_url: format!("type.googleapis.com/{name}"),
        value: msg.encode_to_vec(),
    })
}

/// Parses `-c` text and merges `--config-yaml` over it with protobuf merge
/// semantics (repeated fields append, messages merge, scalars replace), as Envoy.
pub fn parse_and_merge(
    base: Option<&str>,
    overlay: Option<&str>,
    opts: ParseOptions,
) -> Result<Bootstrap, ConfigErrors> {
    let mut out = match base {
        Some(t) => parse_bootstrap(t, opts)?,
        None => Bootstrap::default(),
    };
    if let Some(t) = overlay {
        let over = parse_bootstrap(t, opts).map_err(|mut e| {
            for err in &mut e.0 {
                err.path = join("--config-yaml", &err.path);
            }
            e
        })?;
        out.merge(over.encode_to_vec().as_slice()).map_err(|e| {
            let mut errs = ConfigErrors::default();
            errs.push("--config-yaml", e.to_string());
            errs
        })?;
    }
    Ok(out)
}

/// YAML or JSON text to a JSON value (YAML merge keys applied).
pub fn text_to_json(text: &str) -> Result<Value, ConfigErrors> {
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let mut errs = ConfigErrors::default();
        errs.push("", format!("invalid YAML/JSON: {e}"));
        errs
    })?;
    yaml.apply_merge().map_err(|e| {
        let mut errs = ConfigErrors::default();
        errs.push("", format!("invalid YAML merge key: {e}"));
        errs
    })?;
    if yaml.is_null() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::to_value(&yaml).map_err(|e| {
        let mut errs = ConfigErrors::default();
        errs.push("", format!("YAML is not representable as JSON: {e}"));
        errs
    })
}

/// Normalises and deserialises a JSON value as message `desc`.
pub fn json_to_message(
    value: Value,
    desc: &MessageDescriptor,
    opts: ParseOptions,
) -> Result<DynamicMessage, ConfigErrors> {
    let (msg, errs) = json_to_message_collect(value, desc, opts);
    match msg {
        Some(m) if errs.is_empty() => Ok(m),
        _ => Err(errs),
    }
}

/// Like [`json_to_message`], but returns the message alongside the errors
/// found so far (unknown fields are dropped), so callers can go on finding
/// more errors (`--mode validate` lists every one).
pub fn json_to_message_collect(
    mut value: Value,
    desc: &MessageDescriptor,
    opts: ParseOptions,
) -> (Option<DynamicMessage>, ConfigErrors) {
    // The deserialiser resolves each `@type` in the pool of `desc`, and a
    // descriptor's pool never sees files loaded after it was taken: load
    // every type the text names first, then take `desc` from that pool.
    let mut names = vec![desc.full_name().to_owned()];
    any_type_names(&value, &mut names);
    names.sort_unstable();
    names.dedup();
    let desc = &descriptors::load(names.iter().map(String::as_str))
        .get_message_by_name(desc.full_name())
        .unwrap_or_else(|| desc.clone());
    let mut errs = ConfigErrors::default();
    normalize(&mut value, desc, "", opts, &mut errs);
    // A bad value stops deserialisation; drop it and try again so one run
    // reports every bad value (bounded).
    for _ in 0..64 {
        match deserialize(&value, desc) {
            Ok(m) => return (Some(m), errs),
            Err(e) => {
                let removed =
                    e.0.first()
                        .is_some_and(|err| remove_path(&mut value, &err.path));
                errs.extend(e);
                if !removed {
                    return (None, errs);
                }
            }
        }
    }
    (None, errs)
}

/// Appends the message named by every `@type` in `value`, at any depth, and
/// the `type_url` of every `TypedStruct` (which [`normalize_any`] turns into
/// an `@type`). Names that are no type are harmless: loading skips them.
fn any_type_names(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(url) = map.get("@type").and_then(Value::as_str) {
                let name = type_name(url);
                if name == UDPA_TYPED_STRUCT || name == XDS_TYPED_STRUCT {
                    if let Some(inner) = map.get("type_url").and_then(Value::as_str) {
                        out.push(type_name(inner).to_owned());
                    }
                }
                out.push(name.to_owned());
            }
            map.values().for_each(|v| any_type_names(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| any_type_names(v, out)),
        _ => {}
    }
}

/// The message name in a type URL: what follows its last `/`.
fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Removes the value at a serde path (`a.b[0].c`); false when not found.
fn remove_path(root: &mut Value, path: &str) -> bool {
    let mut segs: Vec<(String, Option<usize>)> = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            segs.push((name.to_owned(), None));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            match idx.trim_end_matches(']').parse::<usize>() {
                Ok(n) => segs.push((String::new(), Some(n))),
                Err(_) => return false,
            }
        }
    }
    let Some(last) = segs.pop() else { return false };
    let mut cur = root;
    for (name, idx) in segs {
        cur = match (idx, cur) {
            (Some(i), Value::Array(a)) => match a.get_mut(i) {
                Some(v) => v,
                None => return false,
            },
            (None, Value::Object(m)) => match m.get_mut(&name) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, cur) {
        ((_, Some(i)), Value::Array(a)) if i < a.len() => {
            a.remove(i);
            true
        }
        ((name, None), Value::Object(m)) => m.remove(&name).is_some(),
        _ => false,
    }
}

fn deserialize(value: &Value, desc: &MessageDescriptor) -> Result<DynamicMessage, ConfigErrors> {
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize(desc.clone(), de).map_err(|e| {
        let path = track.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let mut errs = ConfigErrors::default();
        errs.push(path, e.to_string());
        errs
    })
}

fn is_well_known(name: &str) -> bool {
    name.starts_with("google.protobuf.")
}

/// Walks `value` as message `desc`: reports unknown fields, unwraps
/// `TypedStruct`s, wraps single objects given for repeated fields.
pub fn normalize(
    value: &mut Value,
    desc: &MessageDescriptor,
    path: &str,
    opts: ParseOptions,
    errs: &mut ConfigErrors,
) {
    let full = desc.full_name();
    if full == "google.protobuf.Any" {
        normalize_any(value, path, opts, errs);
        return;
    }
    if is_well_known(full) {
        return;
    }
    let Value::Object(map) = value else {
        // Type errors are reported with their path by the deserialiser.
        return;
    };
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let field = desc
            .get_field_by_name(&key)
            .or_else(|| desc.get_field_by_json_name(&key));
        let Some(field) = field else {
            // Reported (unless allowed) and dropped, so later stages can
            // still find the config's other errors.
            map.remove(&key);
            if !opts.allow_unknown_fields {
                errs.push(join(path, &key), format!("unknown field {key:?} in {full}"));
            }
            continue;
        };
        let fpath = join(path, field.name());
        let Some(v) = map.get_mut(&key) else { continue };
        if v.is_null() {
            continue;
        }
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else {
                continue;
            };
            let value_field = entry.map_entry_value_field();
            if let (Value::Object(m), Kind::Message(vd)) = (v, value_field.kind()) {
                for (k, item) in m.iter_mut() {
                    normalize(item, &vd, &format!("{fpath}[{k:?}]"), opts, errs);
                }
            }
            continue;
        }
        if field.is_list() && !v.is_array() {
            // Envoy's leniency: a single value where a list is expected.
            let single = v.take();
            *v = Value::Array(vec![single]);
        }
        if let Kind::Message(md) = field.kind() {
            match v {
                Value::Array(items) if field.is_list() => {
                    for (i, item) in items.iter_mut().enumerate() {
                        normalize(item, &md, &format!("{fpath}[{i}]"), opts, errs);
                    }
                }
                other => normalize(other, &md, &fpath, opts, errs),
            }
        }
    }
}

fn normalize_any(value: &mut Value, path: &str, opts: ParseOptions, errs: &mut ConfigErrors) {
    let Value::Object(map) = value else { return };
    let Some(type_url) = map.get("@type").and_then(Value::as_str).map(str::to_owned) else {
        errs.push(join(path, "@type"), "Any value has no @type");
        return;
    };
    let name = type_url.rsplit('/').next().unwrap_or(&type_url).to_owned();
    if name == UDPA_TYPED_STRUCT || name == XDS_TYPED_STRUCT {
        // As Envoy: a TypedStruct stands for the message named by its
        // type_url, with its `value` Struct read through the JSON mapping.
        let inner_url = match map.get("type_url").and_then(Value::as_str) {
            Some(u) => u.to_owned(),
            None => {
                errs.push(join(path, "type_url"), "TypedStruct has no type_url");
                return;
            }
        };
        let mut inner = match map.get("value") {
            Some(Value::Object(m)) => m.clone(),
            None | Some(Value::Null) => Map::new(),
            Some(_) => {
                errs.push(join(path, "value"), "TypedStruct value must be an object");
                return;
            }
        };
        inner.insert("@type".into(), Value::String(inner_url));
        *value = Value::Object(inner);
        normalize_any(value, path, opts, errs);
        return;
    }
    let Some(desc) = descriptors::message(&name) else {
        errs.push(
            join(path, "@type"),
            format!("unknown type URL {type_url:?}: weir has no such extension"),
        );
        return;
    };
    if is_well_known(desc.full_name()) {
        return;
    }
    let at_type = map.remove("@type");
    normalize(value, &desc, path, opts, errs);
    if let (Value::Object(map), Some(t)) = (value, at_type) {
        map.insert("@type".into(), t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_yaml_with_camel_case_and_durations() {
        let b = parse_bootstrap(
            r#"
node: {id: n1, cluster: c1}
staticResources:
  clusters:
    name: one              # a single object where a list is expected
    connect_timeout: 0.25s
    type: STATIC
"#,
            ParseOptions::default(),
        )
        .expect("parses");
        let sr = b.static_resources.expect("static_resources");
        assert_eq!(sr.clusters.len(), 1);
        assert_eq!(sr.clusters[0].name, "one");
        let ct = sr.clusters[0].connect_timeout.expect("connect_timeout");
        assert_eq!((ct.seconds, ct.nanos), (0, 250_000_000));
        assert_eq!(b.node.expect("node").id, "n1");
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let err = parse_bootstrap(
            "static_resources: {clusters: [{name: a, bogus: 1}]}",
            ParseOptions::default(),
        )
        .expect_err("unknown field");
        assert_eq!(err.0[0].path, "static_resources.clusters[0].bogus");
        let ok = parse_bootstrap(
            "static_resources: {clusters: [{name: a, bogus: 1}]}",
            ParseOptions {
                allow_unknown_fields: true,
            },
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn typed_struct_is_unwrapped() {
        let b = parse_bootstrap(
            r#"
static_resources:
  listeners:
  - name: l
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          value:
            stat_prefix: ingress
            unknown_inner: 1
"#,
            ParseOptions::default(),
        )
        .expect_err("inner unknown field is found through the TypedStruct");
        assert_eq!(
            b.0[0].path,
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.unknown_inner"
        );
    }

    #[test]
    fn bad_scalar_reports_path() {
        let err = parse_bootstrap(
            "static_resources: {clusters: [{name: a, connect_timeout: soon}]}",
            ParseOptions::default(),
        )
        .expect_err("bad duration");
        assert!(err.0[0].path.contains("connect_timeout"), "{err}");
    }

    #[test]
    fn config_yaml_merges_over_file() {
        let b = parse_and_merge(
            Some("node: {id: a, cluster: c}\nstatic_resources: {clusters: [{name: x}]}"),
            Some("node: {id: b}\nstatic_resources: {clusters: [{name: y}]}"),
            ParseOptions::default(),
        )
        .expect("merges");
        let node = b.node.expect("node");
        assert_eq!((node.id.as_str(), node.cluster.as_str()), ("b", "c"));
        assert_eq!(b.static_resources.expect("sr").clusters.len(), 2);
    }

    /// The type of an `@type` is loaded before deserialising, also when
    /// nothing loaded it before (the pool was just released).
    #[test]
    fn any_of_a_type_not_loaded_yet_parses() {
        use crate::api::envoy::config::listener::v3::{filter::ConfigType, Listener};
        use crate::api::envoy::extensions::filters::network::http_connection_manager::v3::{
            http_filter, HttpConnectionManager,
        };
        const BUFFER: &str = "envoy.extensions.filters.http.buffer.v3.Buffer";
        descriptors::release();
        let any = any_from_text(
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            r#"
name: l
filter_chains:
- filters:
  - name: hcm
    typed_config:
      "@type": type.googleapis.com/udpa.type.v1.TypedStruct
      type_url: type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      value:
        stat_prefix: s
        http_filters:
        - name: buffer
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
            max_request_bytes: 1024
"#,
        )
        .expect("parses");
        let listener = Listener::decode(any.value.as_slice()).expect("listener");
        let Some(ConfigType::TypedConfig(hcm)) = &listener.filter_chains[0].filters[0].config_type
        else {
            panic!("typed_config")
        };
        assert!(hcm.type_url.ends_with("HttpConnectionManager"), "{hcm:?}");
        let hcm = HttpConnectionManager::decode(hcm.value.as_slice()).expect("hcm");
        let Some(http_filter::ConfigType::TypedConfig(buffer)) = &hcm.http_filters[0].config_type
        else {
            panic!("typed_config")
        };
        assert_eq!(buffer.type_url, format!("type.googleapis.com/{BUFFER}"));
        assert!(descriptors::loaded().get_message_by_name(BUFFER).is_some());
    }

    /// Unknown types give the errors they gave with the whole pool loaded
    /// (the texts of weir 472dbc1 `--mode validate`).
    #[test]
    fn unknown_any_types_keep_their_errors() {
        let errs = |text: &str| {
            parse_bootstrap(text, ParseOptions::default())
                .expect_err("unknown type")
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        let at = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
        assert_eq!(
            errs(
                r#"
static_resources:
  listeners:
  - name: l
    filter_chains:
    - filters:
      - name: f
        typed_config: {"@type": type.googleapis.com/foo.Bar, x: 1}
"#
            ),
            [
                format!(
                    r#"{at}.@type: unknown type URL "type.googleapis.com/foo.Bar": weir has no such extension"#
                ),
                format!("{at}: message 'foo.Bar' not found"),
            ]
        );
        assert_eq!(
            errs(
                r#"
static_resources:
  listeners:
  - name: l
    filter_chains:
    - filters:
      - name: f
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/foo.Baz
          value: {a: 1}
"#
            ),
            [
                format!(
                    r#"{at}.@type: unknown type URL "type.googleapis.com/foo.Baz": weir has no such extension"#
                ),
                format!("{at}: message 'foo.Baz' not found"),
            ]
        );
    }
}
