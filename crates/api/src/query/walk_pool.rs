//! Threads at a lower CPU priority for the index walks of large orgs. A one-letter search over a
//! million cards is tens of milliseconds of one core; run beside a small org's board at the same
//! priority it doubles that board's latency whenever they share a core. At `nice` 10 the kernel
//! gives such a walk about a tenth of a contended core, so small orgs' boards keep their latency
//! while large orgs' walks take what is left (and all of it when nothing else runs).
//! `INDEX_WALKS_PER_ORG` still bounds how many of one org's walks wait here, and the pool has a
//! thread per core, so one large org's walks never take all of it from the other large orgs.
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct WalkPool {
    jobs: mpsc::Sender<Job>,
}

/// The pool's threads are gone (the pool is being dropped), or the job panicked.
#[derive(Debug, thiserror::Error)]
#[error("the background walk pool is gone")]
pub struct PoolGone;

impl WalkPool {
    /// `threads` threads `nice` steps below the process's priority (Linux, where the priority
    /// is per thread; elsewhere they run at the process's).
    pub fn new(threads: usize, nice: i32) -> WalkPool {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("pb-walk-bg-{i}"))
                .spawn(move || {
                    lower_priority(nice);
                    loop {
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking walk loses its answer (its caller gets `PoolGone`:
                            // a 503), not the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return, // every sender dropped
                        }
                    }
                })
                .expect("a thread of the walk pool starts");
        }
        WalkPool { jobs }
    }

    /// Runs `f` on a pool thread; its result.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, PoolGone> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| PoolGone)?;
        rx.await.map_err(|_| PoolGone)
    }
}

#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    // SAFETY: getpriority/setpriority with PRIO_PROCESS and who = 0 read and set the calling
    // thread's nice value on Linux; they touch no memory of ours. Raising it needs no right.
    unsafe {
        let now = libc::getpriority(libc::PRIO_PROCESS, 0);
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, (now + nice).min(19));
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_threads_at_the_lower_priority() {
        let pool = WalkPool::new(2, 10);
        let (name, nice) = pool
            .run(|| {
                // SAFETY: getpriority reads the calling thread's nice value.
                let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
                (std::thread::current().name().map(str::to_string), nice)
            })
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("pb-walk-bg-"));
        // SAFETY: as above, for the test's own thread.
        let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(nice, (ours + 10).min(19), "10 above the process's own");
        assert!(pool.run(|| panic!("a walk that panics")).await.is_err());
        assert_eq!(pool.run(|| 7).await.unwrap(), 7, "the thread survived the panic");
        let sums: Vec<u64> = futures::future::join_all((0..8u64).map(|i| pool.run(move || (0..=i).sum::<u64>())))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(sums, [0, 1, 3, 6, 10, 15, 21, 28]);
    }
}
