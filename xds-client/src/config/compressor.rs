//! `envoy.filters.http.compressor` with its compression libraries.

/// `envoy.extensions.filters.http.compressor.v3.Compressor`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressorConfig {
    /// `compressor_library.name`: part of the stat prefix.
    pub library_name: String,
    pub library: CompressorLibrary,
    /// The response direction (`response_direction_config`, or the
    /// deprecated top-level fields when it is absent).
    pub response: ResponseDirection,
    /// `choose_first`.
    pub choose_first: bool,
}

/// How responses are compressed.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseDirection {
    /// `common_config.enabled.default_value` (default true).
    pub enabled: bool,
    /// `common_config.min_content_length` (0 or absent: 30).
    pub min_content_length: u64,
    /// `common_config.content_type`, lowercased (Envoy's defaults when
    /// empty).
    pub content_types: Vec<String>,
    pub disable_on_etag_header: bool,
    pub remove_accept_encoding_header: bool,
    /// `response_direction_config` is set: the direction's stats are
    /// under `response.` (else directly under the library's prefix).
    pub explicit: bool,
}

/// Envoy's default `content_type` list.
pub const DEFAULT_COMPRESSIBLE_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "application/javascript",
    "application/x-javascript",
    "text/javascript",
    "text/x-javascript",
    "text/ecmascript",
    "text/js",
    "text/jscript",
    "text/x-js",
    "application/ecmascript",
    "application/x-json",
    "application/xml",
    "application/json",
    "image/svg+xml",
    "text/xml",
    "application/xhtml+xml",
    "application/grpc-web",
    "application/grpc-web+proto",
];

/// `compressor_library.typed_config`.
#[derive(Debug, Clone, PartialEq)]
pub enum CompressorLibrary {
    Gzip(GzipConfig),
    Brotli(BrotliConfig),
    Zstd(ZstdConfig),
}

impl CompressorLibrary {
    /// The `content-encoding` it produces.
    pub fn encoding(&self) -> &'static str {
        match self {
            CompressorLibrary::Gzip(_) => "gzip",
            CompressorLibrary::Brotli(_) => "br",
            CompressorLibrary::Zstd(_) => "zstd",
        }
    }

    /// The library's stat prefix (Envoy's `statsPrefix()`).
    pub fn stats_prefix(&self) -> &'static str {
        match self {
            CompressorLibrary::Gzip(_) => "gzip.",
            CompressorLibrary::Brotli(_) => "brotli.",
            CompressorLibrary::Zstd(_) => "zstd.",
        }
    }
}

/// `envoy.extensions.compression.gzip.compressor.v3.Gzip`.
#[derive(Debug, Clone, PartialEq)]
pub struct GzipConfig {
    /// zlib level 1..=9 (`DEFAULT_COMPRESSION`: 6, as zlib).
    pub level: u32,
    /// `window_bits` 9..=15 (default 12).
    pub window_bits: u8,
    /// `memory_level` 1..=9 (default 5); see ARCHITECTURE.md.
    pub memory_level: u8,
    /// `chunk_size` (default 4096): the output buffer size.
    pub chunk_size: u32,
}

/// `envoy.extensions.compression.brotli.compressor.v3.Brotli`.
#[derive(Debug, Clone, PartialEq)]
pub struct BrotliConfig {
    /// 0..=11 (default 3).
    pub quality: u32,
    /// 10..=24 (default 18).
    pub window_bits: u32,
    /// 16..=24 (default 24).
    pub input_block_bits: u32,
    pub chunk_size: u32,
    pub disable_literal_context_modeling: bool,
    pub mode: BrotliMode,
}

/// `Brotli.EncoderMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrotliMode {
    /// `DEFAULT` and `GENERIC`.
    Generic,
    Text,
    Font,
}

/// `envoy.extensions.compression.zstd.compressor.v3.Zstd`.
#[derive(Debug, Clone, PartialEq)]
pub struct ZstdConfig {
    /// `compression_level` (default 3, zstd's default).
    pub level: i32,
    pub enable_checksum: bool,
    /// `strategy` as zstd's `ZSTD_strategy` (0: the level's default).
    pub strategy: u32,
    pub chunk_size: u32,
}

/// `envoy.extensions.filters.http.compressor.v3.CompressorPerRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompressorPerRoute {
    /// Overrides the response direction's `enabled` (`disabled: true`
    /// -> false; `overrides.response_direction_config` set -> true).
    pub response_enabled: Option<bool>,
    /// `overrides.response_direction_config.remove_accept_encoding_header`.
    pub remove_accept_encoding_header: Option<bool>,
}
