//! One computation for many viewers: a board whose answer the org's change token names
//! (`BoardQuery::nameable_by_change_token`) is computed once per token and shared, in each
//! coding, by every request that reads the same token — the concurrent ones wait for the one
//! computing it (single flight), the later ones take the bytes.
//!
//! Why this serves nothing stale: a request reads the token first and looks up the answer
//! under it. The answer stored under a token was computed by a request that read that same
//! token before reading its cards, so it holds every change the token names (a change after
//! the read makes the token differ, and the next request misses). An answer whose own token is
//! not the one the request read (a change between the two reads, an index of the generation the
//! org left) is served to the requests that waited for it and kept for nobody. `meta` (the
//! projection's lag) is as old as the computation: `max_age` bounds it, in every coding.
//!
//! The cache is bounded in bytes (`SHARED_ANSWERS_MEMORY`), least recently used out first.
use super::encoding::Encoding;
use crate::query::error::ApiError;
use axum::body::Bytes;
use moka::future::Cache;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default byte budget: ~200 distinct boards of a 1M org in their four codings.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Default longest time an answer is shared, which bounds how old its `meta` may be.
pub const DEFAULT_MAX_AGE_MS: u64 = 1_000;

/// What names a rendered answer, from which each caller's ETag is made.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerName {
    /// The org's change token read with it.
    Token(u64),
    /// A hash of its content (an answer no token names: MongoDB's, or an index's of the
    /// generation the org left).
    Content(String),
}

/// An answer as sent, in one coding.
#[derive(Debug)]
pub struct Rendered {
    /// Held exactly: a `Bytes` made from a `Vec` keeps its whole capacity, and the cache weighs
    /// the length.
    pub bytes: Bytes,
    pub name: AnswerName,
    /// When it was computed (its `meta` is as old).
    pub computed_at: Instant,
}

impl Rendered {
    pub fn new(mut bytes: Vec<u8>, name: AnswerName) -> Rendered {
        bytes.shrink_to_fit();
        Rendered { bytes: bytes.into(), name, computed_at: Instant::now() }
    }
}

/// Which shared answer a request wants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShareKey {
    pub org: String,
    /// The change token the request read.
    pub token: u64,
    /// The caller, for an answer that depends on who asks (`my`, `team`); None otherwise.
    pub caller: Option<String>,
    /// The request as sent.
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    share: ShareKey,
    encoding: Encoding,
}

#[derive(Clone)]
pub struct SharedAnswers {
    cache: Cache<CacheKey, Arc<Rendered>>,
}

/// Why a computation is not kept: it failed, or the token the request read does not name it.
#[derive(Debug)]
enum NotKept {
    Failed(ApiError),
    /// The answer's own token differs (a change between the two reads), or none names it (an
    /// index of the generation the org left): served to the requests that waited for it, kept
    /// for nobody.
    OtherName(Arc<Rendered>),
}

/// An entry lives `max_age` from its computation, whichever coding it is in (an encoded entry
/// is made later than the answer it encodes).
struct FromComputation {
    max_age: Duration,
}

impl moka::Expiry<CacheKey, Arc<Rendered>> for FromComputation {
    fn expire_after_create(&self, _: &CacheKey, v: &Arc<Rendered>, now: Instant) -> Option<Duration> {
        Some(self.max_age.saturating_sub(now.saturating_duration_since(v.computed_at)))
    }
}

impl SharedAnswers {
    /// None when `memory` or `max_age` is zero (sharing off).
    pub fn new(memory: u64, max_age: Duration) -> Option<SharedAnswers> {
        if memory == 0 || max_age.is_zero() {
            return None;
        }
        let cache = Cache::builder()
            .max_capacity(memory)
            .weigher(|k: &CacheKey, v: &Arc<Rendered>| weight(k, v))
            .expire_after(FromComputation { max_age })
            .build();
        Some(SharedAnswers { cache })
    }

    /// The answer `key` names in `encoding`: shared, or computed by `compute` (once for every
    /// request waiting on the same key) and encoded (once per coding). Kept only when the
    /// token the request read names it (`AnswerName::Token(key.token)`).
    pub async fn get(
        &self,
        key: ShareKey,
        encoding: Encoding,
        compute: impl Future<Output = Result<Rendered, ApiError>>,
    ) -> Result<Arc<Rendered>, ApiError> {
        let computed = AtomicBool::new(false);
        let token = key.token;
        let identity = CacheKey { share: key, encoding: Encoding::Identity };
        let plain = async {
            computed.store(true, Ordering::Relaxed);
            match compute.await {
                Ok(r) if r.name == AnswerName::Token(token) => Ok(Arc::new(r)),
                Ok(r) => Err(NotKept::OtherName(Arc::new(r))),
                Err(e) => Err(NotKept::Failed(e)),
            }
        };
        let got = if encoding == Encoding::Identity {
            self.cache.try_get_with_by_ref(&identity, plain).await
        } else {
            let encoded = CacheKey { share: identity.share.clone(), encoding };
            self.cache
                .try_get_with(encoded, async {
                    let plain = match self.cache.try_get_with_by_ref(&identity, plain).await {
                        Ok(plain) => plain,
                        Err(e) => match &*e {
                            NotKept::OtherName(plain) => return Err(NotKept::OtherName(encoded_as(plain, encoding).await?)),
                            NotKept::Failed(e) => return Err(NotKept::Failed(e.clone())),
                        },
                    };
                    encoded_as(&plain, encoding).await
                })
                .await
        };
        crate::events::BoardShared { computed: computed.load(Ordering::Relaxed) }.emit();
        got.or_else(|e| match &*e {
            NotKept::OtherName(answer) => Ok(answer.clone()),
            NotKept::Failed(e) => Err(e.clone()),
        })
    }

    /// Bytes held (keys and answers, as weighed), for metrics and tests.
    pub async fn weighted_bytes(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.weighted_size()
    }
}

/// `plain` in `encoding`, named and aged as `plain`.
async fn encoded_as(plain: &Rendered, encoding: Encoding) -> Result<Arc<Rendered>, NotKept> {
    let bytes = encoding.encode_off_thread(plain.bytes.clone()).await.map_err(NotKept::Failed)?;
    Ok(Arc::new(Rendered { bytes, name: plain.name.clone(), computed_at: plain.computed_at }))
}

fn weight(k: &CacheKey, v: &Rendered) -> u32 {
    const ENTRY_OVERHEAD: usize = 160;
    let bytes = k.share.org.len() + k.share.caller.as_ref().map_or(0, String::len) + k.share.body.len() + v.bytes.len();
    u32::try_from(bytes + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn key(token: u64) -> ShareKey {
        ShareKey { org: "o".into(), token, caller: None, body: Bytes::from_static(b"{}") }
    }

    fn rendered(token: u64, text: &str) -> Rendered {
        Rendered::new(text.as_bytes().to_vec(), AnswerName::Token(token))
    }

    #[tokio::test]
    async fn concurrent_requests_of_one_token_compute_once_and_a_new_token_computes_again() {
        let shared = SharedAnswers::new(1 << 20, Duration::from_secs(60)).unwrap();
        let runs = AtomicUsize::new(0);
        let compute = |token| {
            let runs = &runs;
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok(rendered(token, &"x".repeat(10_000)))
            }
        };
        let answers = futures::future::join_all((0..20).map(|i| {
            let enc = [Encoding::Identity, Encoding::Zstd, Encoding::Gzip, Encoding::Br][i % 4];
            shared.get(key(7), enc, compute(7))
        }))
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one computation for 20 requests in four codings");
        assert!(answers.iter().all(|a| a.as_ref().unwrap().name == AnswerName::Token(7)));
        let zstd = answers[1].as_ref().unwrap();
        assert_eq!(zstd::decode_all(&zstd.bytes[..]).unwrap(), "x".repeat(10_000).as_bytes());
        shared.get(key(8), Encoding::Identity, compute(8)).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2, "another token is another answer");
        let mut other_caller = key(8);
        other_caller.caller = Some("u".into());
        shared.get(other_caller, Encoding::Identity, compute(8)).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3, "another caller is another answer");
    }

    #[tokio::test]
    async fn an_answer_the_read_token_does_not_name_is_served_but_not_kept() {
        let shared = SharedAnswers::new(1 << 20, Duration::from_secs(60)).unwrap();
        for (t, encoding) in [(3, Encoding::Identity), (13, Encoding::Br)] {
            let newer = shared.get(key(t), encoding, async { Ok(rendered(t + 1, "newer")) }).await.unwrap();
            assert_eq!(newer.name, AnswerName::Token(t + 1), "served as computed");
            let content = async { Ok(Rendered::new(b"old index".to_vec(), AnswerName::Content("\"h\"".into()))) };
            assert_eq!(shared.get(key(t), encoding, content).await.unwrap().name, AnswerName::Content("\"h\"".into()));
            let again = shared.get(key(t), encoding, async { Ok(rendered(t, "named")) }).await.unwrap();
            assert_eq!(again.name, AnswerName::Token(t), "{encoding:?}: nothing was kept under token {t} before");
        }
    }

    #[tokio::test]
    async fn a_failed_computation_is_not_kept() {
        let shared = SharedAnswers::new(1 << 20, Duration::from_secs(60)).unwrap();
        let failed = shared.get(key(1), Encoding::Zstd, async { Err(ApiError::Timeout) }).await;
        assert!(matches!(failed, Err(ApiError::Timeout)));
        let next = shared.get(key(1), Encoding::Zstd, async { Ok(rendered(1, "fresh")) }).await.unwrap();
        assert_eq!(zstd::decode_all(&next.bytes[..]).unwrap(), b"fresh");
    }

    #[tokio::test]
    async fn an_answer_lives_max_age_from_its_computation_in_every_coding() {
        let shared = SharedAnswers::new(1 << 20, Duration::from_millis(300)).unwrap();
        let mut old = rendered(5, "old");
        old.computed_at = Instant::now() - Duration::from_millis(290);
        shared.get(key(5), Encoding::Identity, async { Ok(old) }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let fresh = shared.get(key(5), Encoding::Zstd, async { Ok(rendered(5, "fresh")) }).await.unwrap();
        assert_eq!(zstd::decode_all(&fresh.bytes[..]).unwrap(), b"fresh", "the old answer expired 300 ms after its computation");
    }

    #[tokio::test]
    async fn the_bytes_held_stay_within_the_budget() {
        let shared = SharedAnswers::new(200_000, Duration::from_secs(60)).unwrap();
        for token in 0..100 {
            shared.get(key(token), Encoding::Identity, async move { Ok(rendered(token, &"y".repeat(10_000))) }).await.unwrap();
        }
        let held = shared.weighted_bytes().await;
        assert!((100_000..=200_000).contains(&held), "{held}");
    }

    #[test]
    fn sharing_is_off_without_memory_or_age() {
        assert!(SharedAnswers::new(0, Duration::from_secs(1)).is_none());
        assert!(SharedAnswers::new(1, Duration::ZERO).is_none());
    }
}
