//! Cleanup on Ctrl-C / SIGTERM / SIGHUP: half-written outputs (report staging files, a merge's
//! temporary folder) are registered while they exist and removed if the process is interrupted,
//! so an interrupted run leaves nothing behind. Exit status 130, the shell's convention for an
//! interrupted command.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Paths to remove on interrupt, each with the id of the guard that owns it.
static PENDING: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The exit status of an interrupted run (128 + SIGINT).
pub const INTERRUPTED_EXIT: i32 = 130;

/// Installs the handler (once per process; later calls are no-ops).
pub fn install() {
    // An error means a handler is already installed (a library caller, or a second run in one
    // process); the first one already cleans the same registry.
    let _ = ctrlc::set_handler(|| {
        remove_pending();
        std::process::exit(INTERRUPTED_EXIT);
    });
}

fn remove_pending() {
    remove_where(|_| true);
}

/// Removes the registered paths whose guard id passes `select`.
fn remove_where(select: impl Fn(u64) -> bool) {
    let pending = match PENDING.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    for (_, path) in pending.iter().filter(|(id, _)| select(*id)) {
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(path);
        } else {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Keeps `path` registered for removal on interrupt until dropped. Drop it once the path is
/// published (renamed into place) or cleaned up normally.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
}

/// Registers `path` (a file or a folder) for removal if the process is interrupted.
pub fn track(path: &Path) -> Tracked {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut pending = match PENDING.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    pending.push((id, path.to_path_buf()));
    Tracked { id }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut pending = match PENDING.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        pending.retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_paths_are_removed_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kept = dir.path().join("kept");
        let dropped = dir.path().join("dropped");
        std::fs::write(&kept, b"x").expect("write");
        std::fs::create_dir(&dropped).expect("mkdir");
        std::fs::write(dropped.join("inner"), b"x").expect("write");
        let released = track(&kept);
        let released_id = released.id;
        let guard = track(&dropped);
        drop(released);
        // Only this test's ids: other tests in this binary may hold tracked paths right now.
        remove_where(|id| id == released_id || id == guard.id);
        assert!(kept.exists(), "a released path is left alone");
        assert!(
            !dropped.exists(),
            "a tracked folder is removed with its content"
        );
        drop(guard);
    }
}
