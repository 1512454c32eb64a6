//! The compression libraries: Envoy's `Compressor::compress(buffer,
//! Flush | Finish)` over flate2 (zlib-rs), brotli and zstd. Each chunk is
//! flushed (Envoy's `Flush` state), so a streamed response is never held
//! back; the last one finishes the stream.
use std::io::Write;

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress, Status};
use xds_client::config::{BrotliMode, CompressorLibrary};

/// One response's compressor.
pub enum Encoder {
    Gzip {
        z: Compress,
        chunk: usize,
    },
    /// `None` once finished.
    /// Boxed: brotli's encoder state is several KiB.
    Brotli(Option<Box<brotli::CompressorWriter<Vec<u8>>>>),
    Zstd(Option<zstd::stream::write::Encoder<'static, Vec<u8>>>),
    /// The library failed (it does not with valid parameters): nothing
    /// more is sent, the client sees a truncated stream.
    Failed,
}

impl Encoder {
    pub fn new(lib: &CompressorLibrary) -> Encoder {
        match lib {
            CompressorLibrary::Gzip(g) => Encoder::Gzip {
                // window_bits 9..=15 (checked at config time); the gzip
                // wrapper is what Envoy's `window_bits + 16` asks zlib for.
                z: Compress::new_gzip(Compression::new(g.level), g.window_bits),
                chunk: g.chunk_size as usize,
            },
            CompressorLibrary::Brotli(b) => {
                let mut params = brotli::enc::BrotliEncoderParams {
                    quality: b.quality as i32,
                    lgwin: b.window_bits as i32,
                    lgblock: b.input_block_bits as i32,
                    disable_literal_context_modeling: i32::from(b.disable_literal_context_modeling),
                    ..Default::default()
                };
                params.mode = match b.mode {
                    BrotliMode::Generic => {
                        brotli::enc::backward_references::BrotliEncoderMode::BROTLI_MODE_GENERIC
                    }
                    BrotliMode::Text => {
                        brotli::enc::backward_references::BrotliEncoderMode::BROTLI_MODE_TEXT
                    }
                    BrotliMode::Font => {
                        brotli::enc::backward_references::BrotliEncoderMode::BROTLI_MODE_FONT
                    }
                };
                Encoder::Brotli(Some(Box::new(brotli::CompressorWriter::with_params(
                    Vec::new(),
                    b.chunk_size as usize,
                    &params,
                ))))
            }
            CompressorLibrary::Zstd(z) => {
                let e = zstd::stream::write::Encoder::new(Vec::new(), z.level).and_then(|mut e| {
                    e.include_checksum(z.enable_checksum)?;
                    if let Some(s) = zstd_strategy(z.strategy) {
                        e.set_parameter(zstd::stream::raw::CParameter::Strategy(s))?;
                    }
                    Ok(e)
                });
                match e {
                    Ok(e) => Encoder::Zstd(Some(e)),
                    Err(e) => {
                        tracing::warn!(error = %e, "zstd compressor setup failed");
                        Encoder::Failed
                    }
                }
            }
        }
    }

    /// Compresses `input`, flushed (`finish`: ends the stream).
    pub fn compress(&mut self, input: &[u8], finish: bool) -> Bytes {
        let r = match self {
            Encoder::Gzip { z, chunk } => gzip(z, *chunk, input, finish),
            Encoder::Brotli(w) => match w.take() {
                None => Ok(Vec::new()),
                Some(mut bw) => (|| {
                    bw.write_all(input)?;
                    if finish {
                        // Dropping the writer's inner part finishes it.
                        return Ok((*bw).into_inner());
                    }
                    bw.flush()?;
                    let out = std::mem::take(bw.get_mut());
                    *w = Some(bw);
                    Ok(out)
                })(),
            },
            Encoder::Zstd(w) => match w.take() {
                None => Ok(Vec::new()),
                Some(mut zw) => (|| {
                    zw.write_all(input)?;
                    if finish {
                        return zw.finish();
                    }
                    zw.flush()?;
                    let out = std::mem::take(zw.get_mut());
                    *w = Some(zw);
                    Ok(out)
                })(),
            },
            Encoder::Failed => Ok(Vec::new()),
        };
        match r {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                tracing::warn!(error = %e, "response compression failed");
                *self = Encoder::Failed;
                Bytes::new()
            }
        }
    }
}

fn zstd_strategy(s: u32) -> Option<zstd::zstd_safe::Strategy> {
    use zstd::zstd_safe::Strategy as S;
    Some(match s {
        1 => S::ZSTD_fast,
        2 => S::ZSTD_dfast,
        3 => S::ZSTD_greedy,
        4 => S::ZSTD_lazy,
        5 => S::ZSTD_lazy2,
        6 => S::ZSTD_btlazy2,
        7 => S::ZSTD_btopt,
        8 => S::ZSTD_btultra,
        9 => S::ZSTD_btultra2,
        _ => return None,
    })
}

/// Deflates `input` into `chunk`-sized output steps, then sync-flushes
/// (or finishes) the stream.
fn gzip(z: &mut Compress, chunk: usize, input: &[u8], finish: bool) -> std::io::Result<Vec<u8>> {
    let flush = if finish {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(chunk);
    let mut consumed = 0usize;
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(chunk);
        }
        let before = z.total_in();
        let status = z
            .compress_vec(&input[consumed..], &mut out, flush)
            .map_err(std::io::Error::other)?;
        consumed += (z.total_in() - before) as usize;
        let room = out.capacity() > out.len();
        match status {
            Status::StreamEnd => break,
            // All input taken and the flush fit: done for this chunk.
            Status::Ok | Status::BufError if consumed == input.len() && room && !finish => break,
            Status::Ok | Status::BufError => {}
        }
    }
    Ok(out)
}
