//! An org's index as bytes (its image), so that an API instance that has not loaded an org (a
//! new or restarted instance, an org evicted under the memory budget) reads it in bulk instead of
//! building it from every card record: building a 1M-card org decodes each record, folds its
//! texts, sorts every column and cuts trigrams (~8 s of CPU); reading its image is decompression
//! and copies. Pure: `index_cache.rs` keeps images in Redis beside the org's records and catches
//! one up from the org's change stream like any loaded index.
//!
//! An image holds the index's own layout, so it is only read by a build of the same layout: its
//! header carries a hash of the sources that define what the index holds (its fields, the
//! folding of texts, the trigrams, the crates' versions), and an image of another build is
//! ignored, never misread. During a rolling deploy, old and new instances each build what the
//! other stored from the records.
use super::OrgIndex;
use std::io::{Read, Write};

const MAGIC: &[u8; 4] = b"PBIX";
/// The magic and the layout.
const HEADER: usize = MAGIC.len() + 8;

/// zstd's fastest level: 1M seed-like cards make ~160 MB of bincode, ~100-150 MB compressed.
const ZSTD_LEVEL: i32 = 1;

/// Decoding never claims more than this (a damaged length cannot ask for more memory).
const MAX_DECODED: usize = 1 << 32;

/// Bincode reads and writes a value at a time: buffered, zstd sees large blocks.
const BUFFER: usize = 1 << 16;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODED>()
}

/// The layout an image is written in, hashed once per process (every image read and written
/// checks it; the sources are a few hundred KB).
fn layout() -> u64 {
    static LAYOUT: std::sync::LazyLock<u64> = std::sync::LazyLock::new(hash_of_sources);
    *LAYOUT
}

/// FNV-1a over the sources of what an image holds.
fn hash_of_sources() -> u64 {
    // What the index holds and how it is encoded: its sources, the model's (folding, trigrams,
    // stage keys, kinds, times) and the crates' versions (`Cargo.lock`: roaring, bincode). Any
    // edit of these makes the images of earlier builds unread (each org then builds from its
    // records once): a cache is better refused than misread.
    const SOURCES: [&str; 10] = [
        include_str!("mod.rs"),
        include_str!("compact.rs"),
        include_str!("image.rs"),
        include_str!("../../../../board-model/src/card.rs"),
        include_str!("../../../../board-model/src/record.rs"),
        include_str!("../../../../board-model/src/text.rs"),
        include_str!("../../../../board-model/src/model.rs"),
        include_str!("../../../../board-model/src/time.rs"),
        include_str!("../../../../board-model/src/keys.rs"),
        include_str!("../../../../../Cargo.lock"),
    ];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in SOURCES.iter().flat_map(|s| s.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The layout images of this build are written in, as Redis keeps it beside an image (which
/// is stored again over an image of another layout, whatever its position).
pub fn image_layout() -> String {
    format!("{:016x}", layout())
}

/// Bytes written into parts of at most `part_bytes` each.
struct Parts {
    parts: Vec<Vec<u8>>,
    part_bytes: usize,
}

impl Write for Parts {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let written = buf.len();
        while !buf.is_empty() {
            match self.parts.last_mut() {
                Some(part) if part.len() < self.part_bytes => {
                    let n = buf.len().min(self.part_bytes - part.len());
                    part.extend_from_slice(&buf[..n]);
                    buf = &buf[n..];
                }
                // Parts are made at their full size at once (no growth by doubling); a whole
                // image (`usize::MAX`) grows as it comes.
                _ => self.parts.push(Vec::with_capacity(self.part_bytes.min(1 << 20))),
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("not an index image of this build's layout")]
    OtherLayout,
    #[error("damaged index image: {0}")]
    Damaged(String),
}

impl OrgIndex {
    /// The index as an image: a header, then the index (bincode) compressed with zstd as it is
    /// encoded (the image is the only copy made: an index's uncompressed bytes never are), with
    /// a checksum (a damaged image fails to read instead of answering wrong).
    pub fn to_image(&self) -> Vec<u8> {
        self.to_image_parts(usize::MAX).concat()
    }

    /// The image in parts of `part_bytes` (the last one shorter), as Redis stores it: each part
    /// can be handed on and dropped once copied into the command that stores it.
    pub fn to_image_parts(&self, part_bytes: usize) -> Vec<Vec<u8>> {
        let mut out = Parts { parts: Vec::new(), part_bytes: part_bytes.max(1) };
        out.write_all(MAGIC).and_then(|_| out.write_all(&layout().to_le_bytes())).expect("writing into memory fails only without memory");
        let mut zip = zstd::stream::Encoder::new(out, ZSTD_LEVEL).expect("zstd level 1 exists");
        zip.include_checksum(true).expect("a checksum can always be asked");
        let mut writer = std::io::BufWriter::with_capacity(BUFFER, zip);
        bincode::serde::encode_into_std_write(self, &mut writer, config()).expect("writing into memory fails only without memory");
        let zip = writer.into_inner().map_err(|e| e.into_error()).expect("writing into memory fails only without memory");
        zip.finish().expect("writing into memory fails only without memory").parts
    }

    /// The index an image holds, ready to answer and to be caught up from its `stream_id`.
    pub fn from_image(image: &[u8]) -> Result<OrgIndex, ImageError> {
        Self::read_image(image)
    }

    /// The index of the image `image` reads, decompressed and decoded as its bytes arrive (Redis
    /// sends an image in parts: `index_cache.rs`).
    pub fn read_image(mut image: impl Read) -> Result<OrgIndex, ImageError> {
        let mut header = [0u8; HEADER];
        if image.read_exact(&mut header).is_err() || &header[..4] != MAGIC || header[4..] != layout().to_le_bytes() {
            return Err(ImageError::OtherLayout);
        }
        let damaged = |e: &dyn std::fmt::Display| ImageError::Damaged(e.to_string());
        let unzip = zstd::stream::Decoder::new(image).map_err(|e| damaged(&e))?;
        let mut reader = std::io::BufReader::with_capacity(BUFFER, unzip);
        let mut index: OrgIndex = bincode::serde::decode_from_std_read(&mut reader, config()).map_err(|e| damaged(&e))?;
        // The frame's end, where its checksum is checked.
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map_err(|e| damaged(&e))?;
        if !rest.is_empty() {
            return Err(damaged(&"bytes after the index"));
        }
        index.rebuild_slots();
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_of_another_layout_or_damaged_is_refused() {
        let image = OrgIndex::new("5-0".into()).to_image();
        assert_eq!(OrgIndex::from_image(&image).unwrap().stream_id, "5-0");
        let mut other = image.clone();
        other[5] ^= 1;
        assert_eq!(OrgIndex::from_image(&other).unwrap_err(), ImageError::OtherLayout);
        assert_eq!(OrgIndex::from_image(&image[..3]).unwrap_err(), ImageError::OtherLayout);
        let mut damaged = image.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        assert!(matches!(OrgIndex::from_image(&damaged), Err(ImageError::Damaged(_))));
        assert!(matches!(OrgIndex::from_image(&image[..image.len() - 2]), Err(ImageError::Damaged(_))));
    }

    #[test]
    fn an_image_in_parts_is_the_image_cut_at_their_size() {
        let index = OrgIndex::new("5-0".into());
        let (image, parts) = (index.to_image(), index.to_image_parts(7));
        assert_eq!(parts.concat(), image);
        let (last, full) = parts.split_last().unwrap();
        assert!(full.iter().all(|p| p.len() == 7) && (1..=7).contains(&last.len()));
    }
}
