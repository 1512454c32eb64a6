//! A slot on an immutable config object for the runtime state the data
//! plane builds from it once (a per-route filter's buckets, say), so the
//! request path finds it with one atomic load instead of a lookup keyed by
//! the config's address.
use std::any::Any;
use std::sync::{Arc, OnceLock};

/// Runtime state built from the config object that holds this slot, made
/// on first use and dropped with the config. Cloning a config gives an
/// empty slot (the clone is a new config); slots never affect equality.
#[derive(Default)]
pub struct RuntimeSlot(OnceLock<Arc<dyn Any + Send + Sync>>);

impl RuntimeSlot {
    /// The state, made by `init` on first use; `None` only if the slot
    /// holds another type than `T` (each owner stores one type).
    pub fn get_or_init<T: Send + Sync + 'static>(
        &self,
        init: impl FnOnce() -> T,
    ) -> Option<Arc<T>> {
        let v = self.0.get_or_init(|| Arc::new(init()));
        v.clone().downcast::<T>().ok()
    }
}

impl Clone for RuntimeSlot {
    fn clone(&self) -> Self {
        RuntimeSlot::default()
    }
}

impl PartialEq for RuntimeSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for RuntimeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuntimeSlot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_once_and_not_cloned() {
        let s = RuntimeSlot::default();
        let a = s.get_or_init(|| 5u32).expect("u32");
        let b = s.get_or_init(|| 6u32).expect("u32");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(s.clone().get_or_init(|| 7u32).as_deref(), Some(&7));
        assert!(s.get_or_init(|| 1u8).is_none());
        assert_eq!(s, RuntimeSlot::default());
    }
}
