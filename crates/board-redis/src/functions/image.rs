//! `pb_image_put`: stores an org's index image (board-api `query/index/image.rs`) while the org
//! still reads the generation it was built from, unless a later image is stored.
use board_model::keys::OrgKeys;

/// What `pb_image_put` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePut {
    Stored,
    /// The org reads another generation now: nothing stored.
    Moved,
    /// An image of a later change-stream position is stored: nothing stored.
    Older,
}

impl ImagePut {
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePut::Stored => "stored",
            ImagePut::Moved => "moved",
            ImagePut::Older => "older",
        }
    }
}

impl redis::FromRedisValue for ImagePut {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let word: String = redis::FromRedisValue::from_redis_value(v)?;
        match word.as_str() {
            "ok" => Ok(ImagePut::Stored),
            "moved" => Ok(ImagePut::Moved),
            "older" => Ok(ImagePut::Older),
            other => Err(format!("pb_image_put answered {other:?}").into()),
        }
    }
}

/// `FCALL pb_image_put`: the image of the org's index in `keys`' generation, current to the
/// change-stream id `at`.
pub fn image_put_cmd(keys: &OrgKeys, at: &str, image: &[u8]) -> redis::Cmd {
    let mut cmd = super::call("FCALL", "pb_image_put", &[keys.pointer(), &keys.index_image()]);
    cmd.arg(keys.generation().name()).arg(at).arg(image);
    cmd
}
