//! The published configuration: one `ArcSwap<Snapshot>` plus a `watch`
//! version so listener managers and pools react to changes.
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::Snapshot;

/// Holds the current snapshot. Readers `load()` it; the one writer
/// `publish()`es a new one atomically.
#[derive(Debug)]
pub struct SnapshotStore {
    current: ArcSwap<Snapshot>,
    version: watch::Sender<u64>,
}

impl SnapshotStore {
    pub fn new(initial: Snapshot) -> Self {
        let (version, _) = watch::channel(1);
        SnapshotStore {
            current: ArcSwap::from_pointee(initial),
            version,
        }
    }

    /// The current snapshot, pinned.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot and notifies subscribers.
    pub fn publish(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that changes on every publish.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
