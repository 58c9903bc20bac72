//! One worker count for every thread pool the process uses: rayon's global pool (weights,
//! forensics) and candle-core's own pools (GEMM, elementwise barrier pool). candle reads
//! `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` when it first builds a pool, so the count is set
//! in the environment as well as on rayon, before any pool exists.

/// Configures every pool for `requested` workers, clamped to the cores this process may use
/// (more workers than cores only adds contention: 1000 threads made a 0.13 s check take 25 s).
/// Returns the count used. Call once, before any parallel work (the first pool built wins).
pub fn configure(requested: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let used = requested.clamp(1, cores);
    let value = used.to_string();
    // SAFETY: called from the command's entry before any other thread exists (no pool has
    // been built, and the interrupt handler's thread is installed after this), so no other
    // thread can read the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &value);
        std::env::set_var("CANDLE_NUM_THREADS", &value);
    }
    // Ignored when a pool already exists (a library caller that ran work before); the
    // environment still governs candle's pools built later.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(used)
        .build_global();
    used
}

/// Without `--threads`: keeps every pool at its own default size, but decided once. candle asks
/// for its GEMM thread count on every matmul and, with `RAYON_NUM_THREADS` unset, recounts the
/// physical cores by reading `/proc/cpuinfo` each time: 4.7 % of a `check --precision all`'s CPU
/// on SmolLM2 (perf), most of it in the generation check's thousands of one-token matmuls. So
/// candle's default is read once into `RAYON_NUM_THREADS`, and rayon's global pool is built first
/// with rayon's own default (every logical core), which that variable would otherwise change.
/// A `RAYON_NUM_THREADS` the user set is left alone. Call once, before any other thread exists.
pub fn pin_defaults() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let candle = candle_core::utils::get_num_threads();
    // SAFETY: as in `configure`: called from the command's entry before any other thread exists.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", candle.to_string());
    }
    let rayon_default = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon_default)
        .build_global();
}

/// Runs `work` on a worker of rayon's global pool and waits for it (inline when already on one).
///
/// Every parallel step of a forward (candle's GEMMs, the fused kernels of `model::ops`, weight
/// builds) runs on that pool. Called from a thread outside it, each step is injected into the pool
/// while the caller sleeps, and between steps the idle workers spin: three busy threads on two
/// cores. Started on a worker, a step's first half runs on the caller itself and the other half is
/// stolen by the second worker, with no hand-off through a queue and a futex.
pub fn in_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}
