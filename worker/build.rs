//! With the `cuda` feature: compiles `cuda/adamw.cu` (the fused AdamW
//! update, `src/engine/composed/adamw.rs`) to PTX with nvcc, for the compute
//! capability in `CUDA_COMPUTE_CAP` (default 90, H100), as Candle's own
//! kernels are. Without the feature there is nothing to build.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda/adamw.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let ptx = out.join("adamw.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-fmad=false"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("cuda/adamw.cu")
        .arg("-o")
        .arg(&ptx)
        .status();
    let failure = match status {
        Ok(s) if s.success() => return,
        Ok(s) => format!("nvcc failed on cuda/adamw.cu ({s}); its message is above"),
        Err(e) => format!(
            "the cuda feature needs nvcc ({}: {e}): install the CUDA toolkit or set CUDA_ROOT (`.ci/cuda-env.sh` sets one up)",
            nvcc.display()
        ),
    };
    eprintln!("error: {failure}");
    std::process::exit(1);
}
