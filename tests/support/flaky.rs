//! A store whose first N calls (or next N, see `fail_next`) fail as in an outage (transient
//! errors), then passes calls through: sync must retry until storage recovers.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferrotune::storage::{ObjectInfo, ObjectStore, StorageError};

pub struct FlakyStore {
    inner: Arc<dyn ObjectStore>,
    failures_left: AtomicUsize,
}

impl FlakyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, failures: usize) -> Self {
        FlakyStore {
            inner,
            failures_left: AtomicUsize::new(failures),
        }
    }

    /// Makes the next `n` calls fail.
    pub fn fail_next(&self, n: usize) {
        self.failures_left.store(n, Ordering::SeqCst);
    }

    fn outage(&self) -> Result<(), StorageError> {
        let left = self.failures_left.load(Ordering::SeqCst);
        if left > 0 {
            self.failures_left.store(left - 1, Ordering::SeqCst);
            return Err(StorageError::Transient(
                "simulated outage: connection refused".into(),
            ));
        }
        Ok(())
    }
}

impl ObjectStore for FlakyStore {
    fn url(&self) -> &str {
        self.inner.url()
    }
    fn put_file(&self, key: &str, src: &Path) -> Result<ObjectInfo, StorageError> {
        self.outage()?;
        self.inner.put_file(key, src)
    }
    fn get_file(&self, key: &str, dest: &Path) -> Result<ObjectInfo, StorageError> {
        self.outage()?;
        self.inner.get_file(key, dest)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.outage()?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.outage()?;
        self.inner.delete(key)
    }
    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.outage()?;
        self.inner.head(key)
    }
}
