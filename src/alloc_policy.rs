//! The process's heap policy on glibc: keep freed memory for reuse instead of returning it to the
//! kernel after every tensor.
//!
//! A check streams tensors of tens to hundreds of MiB through a few buffers each (the f32 weight,
//! the f64 exact merge, one rounded copy per precision). glibc serves every allocation above its
//! mmap threshold (at most 32 MiB, whatever `M_MMAP_THRESHOLD` asks) with a fresh `mmap` and gives
//! it back with `munmap` on free, so each tensor re-faults and re-zeroes every page it touches: on a
//! 1B-parameter checkpoint that was 40 s of kernel time in a 64 s `--weights-only` run. With
//! `mmap` off for the heap, one arena, and no trimming, the same buffers are reused from the heap;
//! memory is still bounded by the largest working set (the heap never holds more than was live at
//! once, plus fragmentation). Measured with `SHAPE=1b scripts/bench-7b.sh`.

/// glibc `mallopt` parameters (`malloc.h`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    pub const M_TRIM_THRESHOLD: i32 = -1;
    pub const M_MMAP_MAX: i32 = -4;
    pub const M_ARENA_MAX: i32 = -8;
    unsafe extern "C" {
        pub fn mallopt(param: i32, value: i32) -> i32;
    }
}

/// Applies the policy; call once, first thing in `main`. Elsewhere than glibc it does nothing
/// (other allocators cache large blocks themselves).
pub fn apply() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; glibc takes its own lock, and any
    // value is accepted or refused (returns 0) without touching live allocations.
    unsafe {
        // No mmap-served blocks: large buffers come from the heap and are reused after free.
        glibc::mallopt(glibc::M_MMAP_MAX, 0);
        // Never give the top of the heap back: the next tensor needs it again.
        glibc::mallopt(glibc::M_TRIM_THRESHOLD, i32::MAX);
        // One arena: per-thread arenas are themselves mmapped heaps of at most 64 MiB, so a
        // worker's large buffer would fall back to mmap; allocations are few and large here,
        // so contention on one arena does not matter.
        glibc::mallopt(glibc::M_ARENA_MAX, 1);
    }
}
