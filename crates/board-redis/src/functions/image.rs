//! `pb_image_put_parts`: stores an org's index image (board-api `query/index/image.rs`) while the org
//! still reads the generation it was built from, unless a later image is stored; and the reads
//! of a stored image, part by part.
use board_model::keys::OrgKeys;

/// An image is stored in parts of this many bytes (hash fields `0`, `1`, ...), and read part by
/// part: a reader decodes one part while Redis sends the next, and no buffer ever holds the whole
/// image (a 1M-card org's is ~150 MiB: receiving it into one growing buffer was about half of
/// reading it, most of that the kernel handing out fresh pages).
pub const IMAGE_PART_BYTES: usize = 1 << 20;

/// What `pb_image_put_parts` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePut {
    Stored,
    /// The org reads another generation now: nothing stored.
    Moved,
    /// An image of a later change-stream position is stored: nothing stored.
    Older,
}

impl redis::FromRedisValue for ImagePut {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let word: String = redis::FromRedisValue::from_redis_value(v)?;
        match word.as_str() {
            "ok" => Ok(ImagePut::Stored),
            "moved" => Ok(ImagePut::Moved),
            "older" => Ok(ImagePut::Older),
            other => Err(format!("pb_image_put_parts answered {other:?}").into()),
        }
    }
}

/// `FCALL pb_image_put_parts`: the image of the org's index in `keys`' generation, current to the
/// change-stream id `at`, written in `layout` (the build that can read it), in its parts (of
/// `IMAGE_PART_BYTES`). The command is made at its size at once and each part dropped once
/// copied into it; sending it copies it again (redis-rs packs it, its connection buffers it),
/// so for a moment an image is held about three times.
pub fn image_put_cmd<P: AsRef<[u8]>>(keys: &OrgKeys, at: &str, layout: &str, parts: impl IntoIterator<Item = P>) -> redis::Cmd {
    let parts: Vec<P> = parts.into_iter().collect();
    let bytes: usize = parts.iter().map(|p| p.as_ref().len()).sum();
    let (pointer, image) = (keys.pointer(), keys.index_image());
    let mut cmd = redis::Cmd::with_capacity(parts.len() + 8, bytes + pointer.len() + image.len() + at.len() + layout.len() + 64);
    cmd.arg("FCALL").arg("pb_image_put_parts").arg(2).arg(pointer).arg(image);
    cmd.arg(keys.generation().name()).arg(at).arg(layout);
    for part in parts {
        cmd.arg(part.as_ref());
    }
    cmd
}

/// What a stored image is: the change-stream id it is current to, the layout it is written in,
/// its parts and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHead {
    pub at: String,
    pub layout: String,
    pub parts: usize,
    pub bytes: u64,
}

/// `HMGET at layout parts bytes` of the org's image; `ImageHead::from_reply` reads its reply.
pub fn image_head_cmd(keys: &OrgKeys) -> redis::Cmd {
    redis::cmd("HMGET").arg(keys.index_image()).arg("at").arg("layout").arg("parts").arg("bytes").clone()
}

/// The reply of `image_head_cmd`.
pub type ImageHeadReply = (Option<String>, Option<String>, Option<usize>, Option<u64>);

/// A part as `image_part_cmd` reads it: its image's `at` and `layout`, and its bytes.
pub type ImagePartReply = (Option<String>, Option<String>, Option<Vec<u8>>);

impl ImageHead {
    /// None: no image is stored.
    pub fn from_reply((at, layout, parts, bytes): ImageHeadReply) -> Option<ImageHead> {
        Some(ImageHead { at: at?, layout: layout?, parts: parts?, bytes: bytes? })
    }

    /// The part's bytes if it belongs to this image (None: the image was stored again since).
    pub fn part_of(&self, (at, layout, part): ImagePartReply) -> Option<Vec<u8>> {
        let same = at.as_deref() == Some(self.at.as_str()) && layout.as_deref() == Some(self.layout.as_str());
        part.filter(|_| same)
    }
}

/// `HMGET at layout <part>`: a part, with the `at` and `layout` of the image it belongs to (an
/// image stored again while another instance read the parts before would otherwise mix two
/// images; `pb_image_put_parts` never stores other bytes under the same two).
pub fn image_part_cmd(keys: &OrgKeys, part: usize) -> redis::Cmd {
    redis::cmd("HMGET").arg(keys.index_image()).arg("at").arg("layout").arg(part).clone()
}
