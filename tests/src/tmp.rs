//! Temporary files of a test: every directory a test creates under the
//! system temp dir (`$TMPDIR`, else `/tmp`) is owned by a guard that removes
//! it when dropped, so also when the test panics (the guard is dropped while
//! unwinding). Nothing is shared per process: a test binary's statics are
//! never dropped, so a per-process directory would outlive every run.
//!
//! `WEIR_TESTS_KEEP=1` keeps everything (to read a failing test's access
//! logs and rendered configs afterwards).
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether `WEIR_TESTS_KEEP` asks to keep test files.
pub fn keep() -> bool {
    std::env::var_os("WEIR_TESTS_KEEP").is_some()
}

/// A fresh directory `weir-<prefix>-<pid>-<seq>` under the system temp dir,
/// removed (with its contents) on drop. For `filename:` paths in proxy
/// configs, access logs, sockets. Derefs to its [`Path`].
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        let pid = std::process::id();
        loop {
            let seq = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("weir-{prefix}-{pid}-{seq}"));
            // `create_dir` (not `_all`): a leftover of an earlier process
            // with the same pid is never reused (nor removed: not ours).
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `<dir>/<name>` and returns the absolute path.
    /// Panics on I/O errors.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if keep() {
            return;
        }
        // An in-process proxy shuts down in the background: its last
        // access-log open can land between `remove_dir_all` emptying the
        // directory and removing it (ENOTEMPTY). Once the directory is gone
        // nothing can be created in it, so a few retries settle it.
        for _ in 0..20 {
            match std::fs::remove_dir_all(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => return,
            }
        }
    }
}

/// A file path `<name>` in a [`TempDir`] of its own, removed with it on
/// drop. Derefs to the [`Path`], so `&log` goes wherever a `&Path` does.
///
/// Keep the guard in the test (not `move`d into a closure that is dropped
/// early): `let l = &log;` before a `move` closure that needs the path, or
/// `log.to_path_buf()`.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    _dir: TempDir,
}

impl TempFile {
    /// `name` (not created) in a fresh `weir-<prefix>-...` directory.
    pub fn new(prefix: &str, name: &str) -> TempFile {
        let dir =
            TempDir::new(prefix).unwrap_or_else(|e| panic!("temp dir for {prefix}/{name}: {e}"));
        TempFile {
            path: dir.path().join(name),
            _dir: dir,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}
