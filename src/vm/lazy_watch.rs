//! A watch channel made on its first subscription.
//!
//! A tokio watch channel costs about 340 bytes of heap; every defined VM had two (its
//! status and its guest agent's state) for the few callers that ever `Wait` on them,
//! 6.5 MiB with 10,000 VMs (docs/benchmarks.md, "Profiling: scale").
//!
//! The value lives elsewhere, under a lock (the VM's info, its guest view). A subscriber
//! reads it while holding that lock, and the writer sends after changing it under the
//! same lock, so a channel made between the two still ends with the newest value.

use std::sync::OnceLock;

use tokio::sync::watch;

pub(crate) struct LazyWatch<T>(OnceLock<watch::Sender<T>>);

impl<T> Default for LazyWatch<T> {
    fn default() -> Self {
        LazyWatch(OnceLock::new())
    }
}

impl<T> LazyWatch<T> {
    /// Subscribes, making the channel with `current` if there is none yet. Call it
    /// while holding the lock under which the value changes.
    pub(crate) fn subscribe(&self, current: impl FnOnce() -> T) -> watch::Receiver<T> {
        self.0
            .get_or_init(|| watch::Sender::new(current()))
            .subscribe()
    }

    /// Tells the subscribers, if any ever subscribed; call it after the change.
    pub(crate) fn send(&self, value: T) {
        if let Some(tx) = self.0.get() {
            tx.send_replace(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_on_first_subscription_with_the_current_value_then_follows_sends() {
        let w = LazyWatch::default();
        w.send(1); // nobody listens: nothing is made
        assert!(w.0.get().is_none());
        let mut rx = w.subscribe(|| 2);
        assert_eq!(*rx.borrow_and_update(), 2);
        w.send(3);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);
        // A later subscriber shares the channel (its `current` is not asked).
        let rx2 = w.subscribe(|| unreachable!());
        assert_eq!(*rx2.borrow(), 3);
    }
}
