//! `envoy.filters.http.compressor` translation, with its gzip, brotli and
//! zstd compressor libraries.
use crate::api::envoy::config::core::v3::RuntimeFeatureFlag;
use crate::api::envoy::extensions::compression::brotli::compressor::v3 as br;
use crate::api::envoy::extensions::compression::gzip::compressor::v3 as gz;
use crate::api::envoy::extensions::compression::zstd::compressor::v3 as zs;
use crate::api::envoy::extensions::filters::http::compressor::v3 as c;
use crate::config::*;
use crate::error::{join, ConfigErrors};

use super::err;

/// `envoy.extensions.filters.http.compressor.v3.Compressor`.
pub const COMPRESSOR: &str = "envoy.extensions.filters.http.compressor.v3.Compressor";
/// Its per-route form.
pub const COMPRESSOR_PER_ROUTE: &str =
    "envoy.extensions.filters.http.compressor.v3.CompressorPerRoute";
const GZIP: &str = "envoy.extensions.compression.gzip.compressor.v3.Gzip";
const BROTLI: &str = "envoy.extensions.compression.brotli.compressor.v3.Brotli";
const ZSTD: &str = "envoy.extensions.compression.zstd.compressor.v3.Zstd";

/// Envoy's default `min_content_length`.
const DEFAULT_MIN_CONTENT_LENGTH: u64 = 30;

/// `Compressor` -> [`CompressorConfig`]; `path` names the `typed_config`.
#[allow(deprecated)] // the top-level fields still configure the response direction
pub fn compressor(p: &c::Compressor, path: &str) -> Result<CompressorConfig, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if p.request_direction_config.is_some() {
        errs.push(
            join(path, "request_direction_config"),
            "request compression is not implemented",
        );
    }
    let lpath = join(path, "compressor_library");
    let (library_name, library) = match &p.compressor_library {
        None => {
            return Err(err(lpath, "a compressor_library is required"));
        }
        Some(l) => {
            let tpath = join(&lpath, "typed_config");
            let lib = match &l.typed_config {
                None => Err(err(&tpath, "a compressor library typed_config is required")),
                Some(any) => library(any, &tpath),
            };
            match lib {
                Ok(lib) => (l.name.clone(), lib),
                Err(e) => {
                    errs.extend(e);
                    return Err(errs);
                }
            }
        }
    };
    let response = match &p.response_direction_config {
        Some(r) => {
            let rpath = join(path, "response_direction_config");
            for (set, field) in [
                (r.weaken_etag_on_compress, "weaken_etag_on_compress"),
                (
                    !r.uncompressible_response_codes.is_empty(),
                    "uncompressible_response_codes",
                ),
                (r.status_header_enabled, "status_header_enabled"),
            ] {
                if set {
                    errs.push(join(&rpath, field), format!("{field} is not implemented"));
                }
            }
            let common = r.common_config.clone().unwrap_or_default();
            let cpath = join(&rpath, "common_config");
            if !common.content_type_matcher.is_empty() {
                errs.push(
                    join(&cpath, "content_type_matcher"),
                    "content_type_matcher is not implemented",
                );
            }
            let enabled = feature_flag(common.enabled.as_ref(), &join(&cpath, "enabled"))
                .map_err(|e| errs.extend(e))
                .unwrap_or(true);
            ResponseDirection {
                enabled,
                min_content_length: min_length(common.min_content_length.map(|v| v.value)),
                content_types: content_types(&common.content_type),
                disable_on_etag_header: r.disable_on_etag_header,
                remove_accept_encoding_header: r.remove_accept_encoding_header,
                explicit: true,
            }
        }
        None => {
            let enabled = feature_flag(p.runtime_enabled.as_ref(), &join(path, "runtime_enabled"))
                .map_err(|e| errs.extend(e))
                .unwrap_or(true);
            ResponseDirection {
                enabled,
                min_content_length: min_length(p.content_length.map(|v| v.value)),
                content_types: content_types(&p.content_type),
                disable_on_etag_header: p.disable_on_etag_header,
                remove_accept_encoding_header: p.remove_accept_encoding_header,
                explicit: false,
            }
        }
    };
    errs.into_result(CompressorConfig {
        library_name,
        library,
        response,
        choose_first: p.choose_first,
    })
}

fn min_length(v: Option<u32>) -> u64 {
    match v {
        Some(n) if n > 0 => u64::from(n),
        _ => DEFAULT_MIN_CONTENT_LENGTH,
    }
}

fn content_types(types: &[String]) -> Vec<String> {
    if types.is_empty() {
        DEFAULT_COMPRESSIBLE_TYPES
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    } else {
        types.iter().map(|s| s.to_ascii_lowercase()).collect()
    }
}

/// A `RuntimeFeatureFlag`: its `default_value` (default true); weir has
/// no runtime layer, so the key only has to be valid, as Envoy checks.
fn feature_flag(f: Option<&RuntimeFeatureFlag>, path: &str) -> Result<bool, ConfigErrors> {
    let Some(f) = f else { return Ok(true) };
    if f.runtime_key.is_empty() {
        return Err(err(join(path, "runtime_key"), "must not be empty"));
    }
    Ok(f.default_value.map(|v| v.value).unwrap_or(true))
}

fn range(
    v: Option<u32>,
    default: u32,
    lo: u32,
    hi: u32,
    path: &str,
    errs: &mut ConfigErrors,
) -> u32 {
    let v = v.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        errs.push(path, format!("must be between {lo} and {hi}, got {v}"));
    }
    v
}

fn library(
    any: &crate::api::google::protobuf::Any,
    path: &str,
) -> Result<CompressorLibrary, ConfigErrors> {
    let any = crate::support::unwrap_typed_struct(any, path)?;
    let mut errs = ConfigErrors::default();
    let lib = match any.type_url.rsplit('/').next().unwrap_or_default() {
        GZIP => {
            let g: gz::Gzip = super::decode(&any, path)?;
            use gz::gzip::{CompressionLevel as L, CompressionStrategy as S};
            let level = match L::try_from(g.compression_level) {
                Ok(L::DefaultCompression) => 6,
                Ok(l) => l as u32,
                Err(_) => {
                    errs.push(join(path, "compression_level"), "unknown level");
                    6
                }
            };
            if S::try_from(g.compression_strategy) != Ok(S::DefaultStrategy) {
                errs.push(
                    join(path, "compression_strategy"),
                    "only DEFAULT_STRATEGY is implemented",
                );
            }
            CompressorLibrary::Gzip(GzipConfig {
                level,
                window_bits: range(
                    g.window_bits.map(|v| v.value),
                    12,
                    9,
                    15,
                    &join(path, "window_bits"),
                    &mut errs,
                ) as u8,
                memory_level: range(
                    g.memory_level.map(|v| v.value),
                    5,
                    1,
                    9,
                    &join(path, "memory_level"),
                    &mut errs,
                ) as u8,
                chunk_size: range(
                    g.chunk_size.map(|v| v.value),
                    4096,
                    4096,
                    65536,
                    &join(path, "chunk_size"),
                    &mut errs,
                ),
            })
        }
        BROTLI => {
            let b: br::Brotli = super::decode(&any, path)?;
            use br::brotli::EncoderMode as M;
            let mode = match M::try_from(b.encoder_mode) {
                Ok(M::Default | M::Generic) => BrotliMode::Generic,
                Ok(M::Text) => BrotliMode::Text,
                Ok(M::Font) => BrotliMode::Font,
                Err(_) => {
                    errs.push(join(path, "encoder_mode"), "unknown mode");
                    BrotliMode::Generic
                }
            };
            CompressorLibrary::Brotli(BrotliConfig {
                quality: range(
                    b.quality.map(|v| v.value),
                    3,
                    0,
                    11,
                    &join(path, "quality"),
                    &mut errs,
                ),
                window_bits: range(
                    b.window_bits.map(|v| v.value),
                    18,
                    10,
                    24,
                    &join(path, "window_bits"),
                    &mut errs,
                ),
                input_block_bits: range(
                    b.input_block_bits.map(|v| v.value),
                    24,
                    16,
                    24,
                    &join(path, "input_block_bits"),
                    &mut errs,
                ),
                chunk_size: range(
                    b.chunk_size.map(|v| v.value),
                    4096,
                    4096,
                    65536,
                    &join(path, "chunk_size"),
                    &mut errs,
                ),
                disable_literal_context_modeling: b.disable_literal_context_modeling,
                mode,
            })
        }
        ZSTD => {
            let z: zs::Zstd = super::decode(&any, path)?;
            if z.dictionary.is_some() {
                errs.push(
                    join(path, "dictionary"),
                    "zstd dictionaries are not implemented",
                );
            }
            let strategy = match zs::zstd::Strategy::try_from(z.strategy) {
                Ok(s) => s as u32,
                Err(_) => {
                    errs.push(join(path, "strategy"), "unknown strategy");
                    0
                }
            };
            CompressorLibrary::Zstd(ZstdConfig {
                level: z.compression_level.map_or(3, |v| v.value as i32),
                enable_checksum: z.enable_checksum,
                strategy,
                chunk_size: range(
                    z.chunk_size.map(|v| v.value),
                    4096,
                    4096,
                    65536,
                    &join(path, "chunk_size"),
                    &mut errs,
                ),
            })
        }
        other => {
            return Err(err(
                path,
                format!("compressor library {other} is not implemented"),
            ))
        }
    };
    errs.into_result(lib)
}

/// `CompressorPerRoute` -> [`CompressorPerRoute`] (Envoy's
/// `CompressorPerRouteFilterConfig`).
pub fn per_route(
    p: &c::CompressorPerRoute,
    path: &str,
) -> Result<CompressorPerRoute, ConfigErrors> {
    use c::compressor_per_route::Override;
    match &p.r#override {
        None => Err(err(path, "one of disabled or overrides is required")),
        Some(Override::Disabled(_)) => Ok(CompressorPerRoute {
            // As Envoy: the `disabled` case disables, whatever its value.
            response_enabled: Some(false),
            remove_accept_encoding_header: None,
        }),
        Some(Override::Overrides(o)) => {
            if o.compressor_library.is_some() {
                return Err(err(
                    join(&join(path, "overrides"), "compressor_library"),
                    "a per-route compressor library is not implemented",
                ));
            }
            Ok(match &o.response_direction_config {
                None => CompressorPerRoute::default(),
                Some(r) => CompressorPerRoute {
                    response_enabled: Some(true),
                    remove_accept_encoding_header: r.remove_accept_encoding_header.map(|v| v.value),
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::bootstrap::{parse_bootstrap, ParseOptions};
    use crate::config::*;

    /// A listener whose HCM has `filter` (a YAML flow mapping) before the
    /// router, and a route with `per_route` (`typed_per_filter_config`).
    fn yaml(filter: &str, per_route: &str) -> String {
        format!(
            r#"
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config:
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200}}
                {per_route}
          http_filters:
          - name: c
            typed_config: {filter}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
        )
    }

    fn translate(y: &str) -> Result<Snapshot, crate::ConfigErrors> {
        super::super::bootstrap_to_snapshot(
            &parse_bootstrap(y, ParseOptions::default()).expect("parses"),
        )
    }

    fn compressor(s: &Snapshot) -> Arc<CompressorConfig> {
        let l = s.listeners.first().expect("listener");
        match &l.filter_chains[0].filter {
            NetworkFilter::Http(h) => match &h.http_filters[0].kind {
                HttpFilterKind::Compressor(c) => c.clone(),
                other => panic!("{other:?}"),
            },
            NetworkFilter::Tcp(_) => panic!("HTTP expected"),
        }
    }
    use std::sync::Arc;

    const C: &str =
        "\"@type\": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor";
    const GZ: &str =
        "\"@type\": type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip";

    #[test]
    fn defaults_and_libraries() {
        let s = translate(&yaml(
            &format!("{{{C}, compressor_library: {{name: g, typed_config: {{{GZ}}}}}}}"),
            "",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let c = compressor(&s);
        assert_eq!(
            c.library,
            CompressorLibrary::Gzip(GzipConfig {
                level: 6,
                window_bits: 12,
                memory_level: 5,
                chunk_size: 4096
            })
        );
        assert!(c.response.enabled && !c.response.explicit);
        assert_eq!(c.response.min_content_length, 30);
        assert_eq!(
            c.response.content_types.len(),
            DEFAULT_COMPRESSIBLE_TYPES.len()
        );
        let s = translate(&yaml(
            &format!("{{{C}, compressor_library: {{name: b, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli, quality: 5, encoder_mode: TEXT}}}}, response_direction_config: {{common_config: {{min_content_length: 100, content_type: [Text/Plain], enabled: {{default_value: false, runtime_key: k}}}}}}}}"),
            "",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let c = compressor(&s);
        assert!(
            matches!(&c.library, CompressorLibrary::Brotli(b) if b.quality == 5 && b.mode == BrotliMode::Text)
        );
        assert!(!c.response.enabled && c.response.explicit);
        assert_eq!(c.response.min_content_length, 100);
        assert_eq!(c.response.content_types, ["text/plain"]);
    }

    #[test]
    fn unimplemented_fields_are_rejected_by_path() {
        for (extra, path) in [
            (", request_direction_config: {}", "request_direction_config"),
            (
                ", response_direction_config: {uncompressible_response_codes: [206]}",
                "response_direction_config.uncompressible_response_codes",
            ),
            (
                ", response_direction_config: {weaken_etag_on_compress: true}",
                "response_direction_config.weaken_etag_on_compress",
            ),
            (
                ", response_direction_config: {status_header_enabled: true}",
                "response_direction_config.status_header_enabled",
            ),
        ] {
            let e = translate(&yaml(
                &format!("{{{C}, compressor_library: {{name: g, typed_config: {{{GZ}}}}}{extra}}}"),
                "",
            ))
            .expect_err(extra);
            assert!(e.to_string().contains(path), "{e}");
        }
        for (lib, path) in [
            (
                format!("{{{GZ}, compression_strategy: RLE}}"),
                "compression_strategy",
            ),
            (format!("{{{GZ}, window_bits: 20}}"), "window_bits"),
            (
                "{\"@type\": type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd, dictionary: {inline_string: x}}".to_owned(),
                "dictionary",
            ),
        ] {
            let e = translate(&yaml(
                &format!("{{{C}, compressor_library: {{name: g, typed_config: {lib}}}}}"),
                "",
            ))
            .expect_err(path);
            assert!(e.to_string().contains(path), "{e}");
        }
    }

    #[test]
    fn per_route_config() {
        let filter = format!("{{{C}, compressor_library: {{name: g, typed_config: {{{GZ}}}}}}}");
        let s = translate(&yaml(
            &filter,
            "typed_per_filter_config: {c: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.CompressorPerRoute, overrides: {response_direction_config: {remove_accept_encoding_header: true}}}}",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let rc = match &s.listeners[0].filter_chains[0].filter {
            NetworkFilter::Http(h) => match &h.routes {
                RouteSource::Static(rc) => rc.clone(),
                other => panic!("{other:?}"),
            },
            NetworkFilter::Tcp(_) => panic!("HTTP expected"),
        };
        let pf = &rc.vhosts[0].routes[0].per_filter;
        assert_eq!(
            pf.get("c").and_then(|c| c.config.clone()),
            Some(FilterOverride::Compressor(CompressorPerRoute {
                response_enabled: Some(true),
                remove_accept_encoding_header: Some(true),
            }))
        );
        let e = translate(&yaml(
            &filter,
            "typed_per_filter_config: {c: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.CompressorPerRoute, overrides: {compressor_library: {name: x}}}}",
        ))
        .expect_err("per-route library");
        assert!(
            e.to_string().contains("overrides.compressor_library"),
            "{e}"
        );
    }
}
