//! The worker's own malloc settings, applied at start-up wherever it runs
//! (a bare `worker --connect`, `--local`, Kubernetes).
//!
//! With glibc's defaults every allocation above the mmap threshold is a
//! fresh `mmap` whose pages fault in, and freed memory goes back to the
//! kernel; a step of the composed engine (and the host copies of a
//! checkpoint) allocates and frees many such buffers, which made a CPU
//! step 1.4–1.7× slower (BENCHMARKS.md). The worker therefore turns the
//! mmap path off and keeps freed memory (`M_MMAP_MAX = 0`,
//! `M_TRIM_THRESHOLD` = 2 GiB), like `MALLOC_MMAP_MAX_=0
//! MALLOC_TRIM_THRESHOLD_=…` in the environment — unless that environment
//! already says otherwise, which wins. The fused engine allocates nothing
//! activation-sized after its first step, so for it the settings matter
//! little; `bench` measures both.

/// Applies the settings above; returns whether it did (false: not glibc,
/// or the environment sets them).
#[allow(unsafe_code)]
pub fn tune_malloc() -> bool {
    if std::env::var_os("MALLOC_MMAP_MAX_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
    {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocator parameters; it is
        // thread-safe and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
