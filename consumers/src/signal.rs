//! A flag for the consumer loop's next turn, with a wake-up for a loop that waits for messages
//! on idle partitions ("Redis lost the projection", "the group left this member out").
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub struct Signal {
    flag: AtomicBool,
    pub(crate) notify: tokio::sync::Notify,
}

impl Signal {
    pub fn raise(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }
    pub fn take(&self) -> bool {
        self.flag.swap(false, Ordering::Relaxed)
    }
    pub fn is_raised(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}
