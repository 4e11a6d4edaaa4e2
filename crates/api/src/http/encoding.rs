//! Content codings of board answers: which one a client takes (`Accept-Encoding`) and the bytes
//! in it. A board is ~280 KB of repetitive JSON that compresses ~10×; the levels are the fast
//! ones because an answer no shared cache holds is compressed on every request (a shared one
//! once per change, `shared_answers`). The other routes go through tower-http's compression
//! layer, which leaves a response that already has a `Content-Encoding` alone; tower-http's
//! negotiation is private to it, hence this small one.
use crate::query::error::ApiError;
use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use std::io::Write;

/// zstd's level 1: ~2× faster than its default for a few % more bytes.
const ZSTD_LEVEL: i32 = 1;
/// Brotli's quality 4: the fastest before its ratio falls to gzip's.
const BROTLI_QUALITY: u32 = 4;
/// Brotli's window: 4 MiB, above any board.
const BROTLI_WINDOW_BITS: u32 = 22;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Identity,
    Gzip,
    Br,
    Zstd,
}

impl Encoding {
    /// The codings produced, best first: on equal q-values the client gets the smaller bytes
    /// for the same CPU (zstd's level 1 compresses JSON better and faster than gzip's).
    const PRODUCED: [Encoding; 3] = [Encoding::Zstd, Encoding::Br, Encoding::Gzip];

    fn token(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
        }
    }

    /// The `Content-Encoding` to send, none for identity.
    pub fn content_encoding(self) -> Option<&'static str> {
        (self != Encoding::Identity).then(|| self.token())
    }

    /// The coding to answer in, from every `Accept-Encoding` header (RFC 9110 12.5.3): the
    /// produced coding of the highest q-value above 0 (a coding not listed takes `*`'s), else
    /// identity.
    pub fn negotiate(headers: &HeaderMap) -> Encoding {
        let offers: Vec<(String, f32)> = headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(parse_offer)
            .collect();
        let q_of = |token: &str| {
            let named = offers.iter().find(|(t, _)| t == token);
            named.or_else(|| offers.iter().find(|(t, _)| t == "*")).map_or(0.0, |(_, q)| *q)
        };
        let mut best = (Encoding::Identity, 0.0f32);
        for e in Encoding::PRODUCED {
            let q = q_of(e.token());
            if q > best.1 {
                best = (e, q);
            }
        }
        best.0
    }

    /// `bytes` in this coding, compressed on a blocking thread (fast levels, still ~1 ms for a
    /// big board: not on the threads that serve requests).
    pub async fn encode_off_thread(self, bytes: Bytes) -> Result<Bytes, ApiError> {
        if self == Encoding::Identity {
            return Ok(bytes);
        }
        tokio::task::spawn_blocking(move || self.encode(&bytes))
            .await
            .map_err(|e| ApiError::Internal(format!("compressing an answer: {e}")))
    }

    /// `bytes` in this coding, held exactly (a `Bytes` made from a `Vec` keeps its capacity,
    /// and zstd's output buffer is sized for the input).
    pub fn encode(self, bytes: &[u8]) -> Bytes {
        let mut out = match self {
            Encoding::Identity => bytes.to_vec(),
            Encoding::Zstd => zstd::bulk::compress(bytes, ZSTD_LEVEL).expect("compressing into memory cannot fail"),
            Encoding::Gzip => {
                let mut w = flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 8), flate2::Compression::fast());
                w.write_all(bytes).expect("writing into memory cannot fail");
                w.finish().expect("writing into memory cannot fail")
            }
            Encoding::Br => {
                let mut out = Vec::with_capacity(bytes.len() / 8);
                {
                    let mut w = brotli::CompressorWriter::new(&mut out, 64 * 1024, BROTLI_QUALITY, BROTLI_WINDOW_BITS);
                    w.write_all(bytes).expect("writing into memory cannot fail");
                }
                out
            }
        };
        out.shrink_to_fit();
        out.into()
    }
}

/// One `coding;q=x` of the header, the coding lower-cased; a malformed q-value counts as 0.
fn parse_offer(item: &str) -> Option<(String, f32)> {
    let mut parts = item.split(';');
    let token = parts.next()?.trim().to_ascii_lowercase();
    if token.is_empty() {
        return None;
    }
    let q = parts
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
        .map_or(1.0, |(_, v)| v.trim().parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q)).unwrap_or(0.0));
    Some((token, q))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn negotiated(values: &[&str]) -> Encoding {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT_ENCODING, v.parse().unwrap());
        }
        Encoding::negotiate(&h)
    }

    #[test]
    fn the_highest_q_value_wins_and_ties_go_to_the_smaller_coding() {
        assert_eq!(negotiated(&[]), Encoding::Identity);
        assert_eq!(negotiated(&["gzip, deflate, br, zstd"]), Encoding::Zstd, "a browser's header");
        assert_eq!(negotiated(&["gzip, deflate, br"]), Encoding::Br);
        assert_eq!(negotiated(&["GZIP"]), Encoding::Gzip);
        assert_eq!(negotiated(&["zstd;q=0.5, gzip;q=0.9"]), Encoding::Gzip);
        assert_eq!(negotiated(&["gzip;q=0.2", "br ; Q=0.8"]), Encoding::Br, "several headers, spaces, case");
        assert_eq!(negotiated(&["*"]), Encoding::Zstd);
        assert_eq!(negotiated(&["*;q=0.5, zstd;q=0"]), Encoding::Br, "q=0 refuses a coding * would allow");
        assert_eq!(negotiated(&["deflate, compress, identity"]), Encoding::Identity, "nothing produced is accepted");
        assert_eq!(negotiated(&["gzip;q=nope, br;q=2"]), Encoding::Identity, "malformed q-values accept nothing");
        assert_eq!(negotiated(&[",, ;q=1"]), Encoding::Identity);
    }

    #[test]
    fn every_coding_decodes_back_to_the_bytes() {
        let json: Vec<u8> = (0..2_000).flat_map(|i| format!(r#"{{"_id":"{i:024x}","name":"Jane Doe {i}"}},"#).into_bytes()).collect();
        for e in [Encoding::Identity, Encoding::Gzip, Encoding::Br, Encoding::Zstd] {
            let encoded = e.encode(&json);
            let mut decoded = Vec::new();
            match e {
                Encoding::Identity => decoded.extend_from_slice(&encoded),
                Encoding::Gzip => drop(flate2::read::GzDecoder::new(&encoded[..]).read_to_end(&mut decoded).unwrap()),
                Encoding::Br => drop(brotli::Decompressor::new(&encoded[..], 4096).read_to_end(&mut decoded).unwrap()),
                Encoding::Zstd => decoded = zstd::decode_all(&encoded[..]).unwrap(),
            }
            assert_eq!(decoded, json, "{e:?}");
            if e != Encoding::Identity {
                assert!(encoded.len() * 4 < json.len(), "{e:?}: {} of {}", encoded.len(), json.len());
            }
        }
    }
}
