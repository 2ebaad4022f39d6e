//! Handing over from the CPU `worker` to the CUDA build, with one clear
//! error when the machine lacks a CUDA library.
//!
//! Candle's `cuda` feature links cudarc with `dynamic-linking`: the CUDA
//! worker binary names libcuda, cuBLAS, cuRAND, NVRTC and NCCL as needed
//! libraries, so on a machine without them the dynamic loader refuses to
//! start it ("error while loading shared libraries: …") before any Stride
//! code runs — cudarc's `is_culib_present()` exists only for its
//! `dynamic-loading` mode, which Candle does not use. The CUDA container
//! therefore starts the CPU `worker` first, with `STRIDE_CUDA_WORKER`
//! pointing at the CUDA binary: it asks `ldd` which libraries that binary
//! cannot find, refuses with a message naming each one and where it comes
//! from, and otherwise `exec`s the CUDA binary with the same arguments.
//! Without `STRIDE_CUDA_WORKER` nothing changes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The variable naming the CUDA worker binary to hand over to.
pub const CUDA_WORKER_ENV: &str = "STRIDE_CUDA_WORKER";

/// Libraries `ldd` reports as "not found" for a binary.
pub fn missing_libraries(ldd_output: &str) -> Vec<String> {
    ldd_output
        .lines()
        .filter_map(|l| {
            let (name, target) = l.trim().split_once("=>")?;
            (target.trim() == "not found").then(|| name.trim().to_string())
        })
        .collect()
}

/// Where a missing library comes from.
fn remedy(lib: &str) -> &'static str {
    if lib.starts_with("libcuda.") {
        "the NVIDIA driver: run on a GPU node with the NVIDIA container runtime (Kubernetes: the NVIDIA device plugin and `nvidia.com/gpu` limits)"
    } else if lib.starts_with("libnccl") {
        "NCCL 2: the CUDA image installs it; elsewhere `pip install nvidia-nccl-cu13` or NVIDIA's libnccl2 package, on LD_LIBRARY_PATH"
    } else {
        "the CUDA 13 runtime libraries (cuBLAS, cuRAND, NVRTC): use the nvidia/cuda runtime base image or put the toolkit's lib64 on LD_LIBRARY_PATH"
    }
}

/// Why the CPU worker could not hand over to the CUDA build.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    #[error(
        "{CUDA_WORKER_ENV}={}: no such file; it must name the CUDA build of the worker (cargo build --release -p stride-worker --features cuda)",
        .0.display()
    )]
    NoSuchFile(PathBuf),
    /// The CUDA binary needs libraries this machine lacks (the text names
    /// each one and where it comes from).
    #[error("{0}")]
    MissingLibraries(String),
    #[error("cannot start {}: {source}", .binary.display())]
    Exec {
        binary: PathBuf,
        source: std::io::Error,
    },
}

/// The error for a CUDA worker that cannot start here.
pub fn explain(binary: &Path, missing: &[String]) -> String {
    let mut s = format!(
        "the CUDA worker {} cannot start on this machine; missing:",
        binary.display()
    );
    for lib in missing {
        s.push_str(&format!("\n  {lib} — from {}", remedy(lib)));
    }
    s.push_str(&format!(
        "\nTo train on CPUs instead, run the CPU image (deploy/Dockerfile.cpu) or unset {CUDA_WORKER_ENV} and set worker.device = \"cpu\"."
    ));
    s
}

/// If `STRIDE_CUDA_WORKER` is set: refuses (returns the message) when the
/// CUDA binary misses a library, else replaces this process with it (and
/// only returns on failure). Returns `Ok(())` when there is nothing to do.
pub fn hand_over(args: &[std::ffi::OsString]) -> Result<(), HandOverError> {
    let Some(binary) = std::env::var_os(CUDA_WORKER_ENV).filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let binary = Path::new(&binary);
    if !binary.is_file() {
        return Err(HandOverError::NoSuchFile(binary.to_path_buf()));
    }
    // `ldd` fails on static or non-ELF files: then let the exec speak.
    if let Ok(out) = Command::new("ldd").arg(binary).output() {
        let missing = missing_libraries(&String::from_utf8_lossy(&out.stdout));
        if !missing.is_empty() {
            return Err(HandOverError::MissingLibraries(explain(binary, &missing)));
        }
    }
    use std::os::unix::process::CommandExt as _;
    // Removed for the child: a misconfigured path to a CPU build must not
    // hand over to itself forever.
    let e = Command::new(binary)
        .args(args)
        .env_remove(CUDA_WORKER_ENV)
        .exec();
    Err(HandOverError::Exec {
        binary: binary.to_path_buf(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LDD: &str = "\tlinux-vdso.so.1 (0x00007ffd5d5f1000)
\tlibcuda.so.1 => not found
\tlibnccl.so.2 => not found
\tlibcublas.so.13 => /usr/local/cuda/lib64/libcublas.so.13 (0x00007f5f0c000000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f5f0be00000)
";

    #[test]
    fn names_each_missing_library_and_its_source() {
        let missing = missing_libraries(LDD);
        assert_eq!(missing, ["libcuda.so.1", "libnccl.so.2"]);
        let text = explain(Path::new("/opt/worker-cuda"), &missing);
        assert!(
            text.contains("libcuda.so.1 — from the NVIDIA driver"),
            "{text}"
        );
        assert!(text.contains("libnccl.so.2 — from NCCL"), "{text}");
        assert!(!text.contains("libcublas"), "{text}");
    }
}
