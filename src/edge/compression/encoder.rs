//! The streaming encoders: gzip (flate2 on zlib-ng), brotli and zstd, the same crates Pingora
//! builds. Each chunk that goes in comes out at once (a sync flush per chunk), so an event
//! stream or a slow download reaches the client as it is sent; the end of the body finishes the
//! stream (gzip trailer, brotli's last block, zstd's epilogue).
//!
//! Pingora's own encoders (`protocols::http::compression`) hold the output until their buffers
//! fill, and its brotli encoder only flushes at the end, never finishing the stream; hence
//! these.

use super::Coding;
use brotli::CompressorWriter;
use bytes::Bytes;
use flate2::write::GzEncoder;
use std::io::{self, Write};

/// brotli's window: 2^19 bytes (Pingora's choice too), a quarter of the default 4 MiB, to
/// bound the memory of each response being compressed.
const BROTLI_LGWIN: u32 = 19;
const BROTLI_BUFFER: usize = 4096;

/// One response's encoder.
pub enum Encoder {
    Gzip(GzEncoder<Vec<u8>>),
    // Boxed: brotli's state is large, and this enum lives in every compressed response's
    // module context.
    Brotli(Box<CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    pub fn new(coding: Coding, level: u32) -> io::Result<Encoder> {
        Ok(match coding {
            Coding::Gzip => {
                Encoder::Gzip(GzEncoder::new(Vec::new(), flate2::Compression::new(level)))
            }
            Coding::Brotli => Encoder::Brotli(Box::new(CompressorWriter::new(
                Vec::new(),
                BROTLI_BUFFER,
                level,
                BROTLI_LGWIN,
            ))),
            Coding::Zstd => {
                Encoder::Zstd(zstd::stream::write::Encoder::new(Vec::new(), level as i32)?)
            }
        })
    }

    /// Compresses `input` and returns everything the encoder has produced, flushed so the
    /// client can decode all of `input` from it.
    pub fn chunk(&mut self, input: &[u8]) -> io::Result<Bytes> {
        if input.is_empty() {
            // A flush of nothing would still cost an empty block.
            return Ok(Bytes::new());
        }
        match self {
            Encoder::Gzip(e) => {
                e.write_all(input)?;
                e.flush()?;
                Ok(take(e.get_mut()))
            }
            Encoder::Brotli(e) => {
                e.write_all(input)?;
                e.flush()?;
                Ok(take(e.get_mut()))
            }
            Encoder::Zstd(e) => {
                e.write_all(input)?;
                e.flush()?;
                Ok(take(e.get_mut()))
            }
        }
    }

    /// Compresses the last `input` and ends the stream: what is left of the output, with the
    /// format's trailer.
    pub fn finish(self, input: &[u8]) -> io::Result<Bytes> {
        Ok(Bytes::from(match self {
            Encoder::Gzip(mut e) => {
                e.write_all(input)?;
                e.finish()?
            }
            Encoder::Brotli(mut e) => {
                e.write_all(input)?;
                e.into_inner()
            }
            Encoder::Zstd(mut e) => {
                e.write_all(input)?;
                e.finish()?
            }
        }))
    }
}

fn take(out: &mut Vec<u8>) -> Bytes {
    Bytes::from(std::mem::take(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn decode(coding: Coding, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            Coding::Gzip => {
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Brotli => {
                brotli::Decompressor::new(data, 4096)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Coding::Zstd => {
                out = zstd::stream::decode_all(data).unwrap();
            }
        }
        out
    }

    /// What a streaming decoder can read from a prefix of the output, without the end.
    fn decode_prefix(coding: Coding, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 4096];
        let n = match coding {
            Coding::Gzip => flate2::read::GzDecoder::new(data).read(&mut out).unwrap(),
            Coding::Brotli => brotli::Decompressor::new(data, 4096)
                .read(&mut out)
                .unwrap(),
            Coding::Zstd => zstd::stream::read::Decoder::new(data)
                .unwrap()
                .read(&mut out)
                .unwrap(),
        };
        out.truncate(n);
        out
    }

    #[test]
    fn every_chunk_is_decodable_before_the_end_and_the_whole_stream_round_trips() {
        for (coding, level) in [(Coding::Gzip, 6), (Coding::Brotli, 4), (Coding::Zstd, 3)] {
            let mut e = Encoder::new(coding, level).unwrap();
            let first = e.chunk(b"data: one\n\n").unwrap();
            assert_eq!(
                decode_prefix(coding, &first),
                b"data: one\n\n",
                "{coding:?}: the first event must be readable before the stream ends"
            );
            assert!(e.chunk(b"").unwrap().is_empty());
            let second = e.chunk(&b"data: two\n\n".repeat(100)).unwrap();
            let end = e.finish(b"data: three\n\n").unwrap();
            let whole = [first, second, end].concat();
            let mut expected = b"data: one\n\n".to_vec();
            expected.extend(b"data: two\n\n".repeat(100));
            expected.extend(b"data: three\n\n");
            assert_eq!(decode(coding, &whole), expected, "{coding:?}");
        }
    }

    #[test]
    fn an_empty_body_still_makes_a_valid_stream() {
        for coding in [Coding::Gzip, Coding::Brotli, Coding::Zstd] {
            let end = Encoder::new(coding, 1).unwrap().finish(b"").unwrap();
            assert!(decode(coding, &end).is_empty(), "{coding:?}");
        }
    }
}
