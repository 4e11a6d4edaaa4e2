//! An org's index as bytes (its image), so that an API instance that has not loaded an org (a
//! new or restarted instance, an org evicted under the memory budget) reads it in bulk instead of
//! building it from every card record: building a 1M-card org decodes each record, folds its
//! texts, sorts every column and cuts trigrams (~8 s of CPU); reading its image is decompression
//! and copies. Pure: `index_cache.rs` keeps images in Redis beside the org's records and catches
//! one up from the org's change stream like any loaded index.
//!
//! An image holds the index's own layout, so it is only read by a build of the same layout: its
//! header carries a hash of the sources that define what the index holds (its fields, the
//! folding of texts, the trigrams), and an image of another build is ignored, never misread.
use super::OrgIndex;

const MAGIC: &[u8; 4] = b"PBIX";
/// The magic, the layout, the length of the index's bytes before compression.
const HEADER: usize = MAGIC.len() + 8 + 8;

/// zstd's fastest level: ~400 MB/s to compress and ~1 GB/s back, for an image of 60 % of the
/// index's bytes (1M seed-like cards: 167 MB of bincode, 103 MB compressed), so that Redis keeps
/// ~100 bytes a card more.
const ZSTD_LEVEL: i32 = 1;

/// An image says how long the index's bytes are; one that says more is refused (a damaged
/// length must not ask for memory).
const MAX_DECODED: usize = 1 << 32;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODED>()
}

/// The layout an image is written in: FNV-1a over the sources of what it holds.
fn layout() -> u64 {
    const SOURCES: [&str; 5] = [
        include_str!("mod.rs"),
        include_str!("compact.rs"),
        include_str!("image.rs"),
        include_str!("../../../../board-model/src/card.rs"),
        include_str!("../../../../board-model/src/record.rs"),
    ];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in SOURCES.iter().flat_map(|s| s.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// An index's bytes before compression (`OrgIndex::image_parts`).
pub struct ImageParts {
    raw: Vec<u8>,
}

impl ImageParts {
    /// The image: compressed whole (streaming bincode's small writes through zstd is three
    /// times slower).
    pub fn pack(self) -> Vec<u8> {
        let mut zip = zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd level 1 exists");
        zip.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).expect("a checksum can always be asked");
        let packed = zip.compress(&self.raw).expect("compressing into memory fails only without memory");
        let mut out = Vec::with_capacity(HEADER + packed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&layout().to_le_bytes());
        out.extend_from_slice(&(self.raw.len() as u64).to_le_bytes());
        out.extend_from_slice(&packed);
        out
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
    /// The index as an image: a header, then the index (bincode) compressed with zstd, with a
    /// checksum (a damaged image fails to read instead of answering wrong).
    pub fn to_image(&self) -> Vec<u8> {
        self.image_parts().pack()
    }

    /// The index's bytes, to be packed into an image (`ImageParts::pack`) without holding the
    /// index: encoding takes a third of the time, compressing the rest.
    pub fn image_parts(&self) -> ImageParts {
        ImageParts { raw: bincode::serde::encode_to_vec(self, config()).expect("an index always encodes") }
    }

    /// The index an image holds, ready to answer and to be caught up from its `stream_id`.
    pub fn from_image(image: &[u8]) -> Result<OrgIndex, ImageError> {
        if image.len() < HEADER || &image[..4] != MAGIC || image[4..12] != layout().to_le_bytes() {
            return Err(ImageError::OtherLayout);
        }
        let damaged = |e: &dyn std::fmt::Display| ImageError::Damaged(e.to_string());
        let len = u64::from_le_bytes(image[12..HEADER].try_into().expect("8 bytes")) as usize;
        if len > MAX_DECODED {
            return Err(damaged(&format!("says it holds {len} bytes")));
        }
        let raw = zstd::bulk::decompress(&image[HEADER..], len).map_err(|e| damaged(&e))?;
        let (mut index, used): (OrgIndex, usize) = bincode::serde::decode_from_slice(&raw, config()).map_err(|e| damaged(&e))?;
        if used != raw.len() {
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
}
