//! Builds the kernels twice from the same source (src/cuda):
//!
//! - always: every `.cu` file and the emulator, with g++ in STRIDE_EMU mode
//!   (`-x c++ -std=c++17 -O2 -ffp-contract=off`), into a static library:
//!   the CPU path the tests run;
//! - with the `cuda` feature: every kernel file but the emulator's self
//!   tests, with nvcc, into ONE fatbin (sm_90 SASS and compute_90 PTX, ahead
//!   of time), `$OUT_DIR/stride_kernels.fatbin`, checked to hold both.
//!
//! With `cuda` it also records nvcc's CUDA release (`STRIDE_NVCC_RELEASE`,
//! for the GPU layer's messages about drivers) and, when
//! `STRIDE_CUDA_LINK_DIR` is set, adds that folder to the linker's search
//! path: check.sh puts link stubs of the CUDA libraries there (libcuda and
//! the toolkit libraries cudarc links, for machines that have neither a
//! driver nor those libraries; the binaries load the real ones where they
//! run).
//!
//! It also scans the `.cu` files for `extern "C" __global__ void stride_*`
//! and writes `$OUT_DIR/kernels.rs`: the kernel names (the fatbin's entry
//! points) and the declarations of their emulator launchers. Each kernel
//! `stride_x` must be followed by its `STRIDE_EMU_LAUNCHER(x)` line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulator's own test kernels: in the CPU library, not the fatbin.
const SELFTEST: &str = "selftest.cu";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda");
    for var in [
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "PATH",
        "CXX",
        "STRIDE_EMU_VALGRIND",
        "STRIDE_CUDA_LINK_DIR",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let dir = Path::new("src/cuda");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| fail(&format!("cannot list {}: {e}", dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for path in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        println!("cargo::rerun-if-changed={}", path.path().display());
    }

    let mut gpu_kernels = Vec::new();
    let mut all_kernels = Vec::new();
    for source in &sources {
        let text = std::fs::read_to_string(source)
            .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", source.display())));
        let names = exported_kernels(source, &text);
        if source.file_name().is_some_and(|f| f != SELFTEST) {
            gpu_kernels.extend(names.iter().cloned());
        }
        all_kernels.extend(names);
    }
    write_kernel_table(&out.join("kernels.rs"), &gpu_kernels, &all_kernels);

    emulator_library(&sources);

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let gpu_sources: Vec<&PathBuf> = sources
            .iter()
            .filter(|p| p.file_name().is_some_and(|f| f != SELFTEST))
            .collect();
        fatbin(&out, &gpu_sources);
        println!("cargo::rustc-env=STRIDE_NVCC_RELEASE={}", nvcc_release());
        if let Some(dir) = std::env::var_os("STRIDE_CUDA_LINK_DIR") {
            println!(
                "cargo::rustc-link-search=native={}",
                PathBuf::from(dir).display()
            );
        }
    }
}

/// nvcc's CUDA release, "13.2" from "Cuda compilation tools, release 13.2,
/// V13.2.86".
fn nvcc_release() -> String {
    let nvcc = nvcc();
    let output = Command::new(&nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| fail(&format!("{} --version: {e}", nvcc.display())));
    let text = String::from_utf8_lossy(&output.stdout);
    text.split("release ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .unwrap_or_else(|| {
            fail(&format!(
                "no release in `{} --version`: {text}",
                nvcc.display()
            ))
        })
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

/// The `stride_*` kernels a file exports, each checked to have its
/// STRIDE_EMU_LAUNCHER line.
fn exported_kernels(source: &Path, text: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __global__ void";
    let mut names = Vec::new();
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut rest = flat.as_str();
    while let Some(at) = rest.find(MARK) {
        rest = &rest[at + MARK.len()..];
        let name: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.starts_with("stride_") {
            fail(&format!(
                "{}: exported kernel `{name}` must be named stride_<kernel>_<type>",
                source.display()
            ));
        }
        let short = &name["stride_".len()..];
        if !flat.contains(&format!("STRIDE_EMU_LAUNCHER({short})")) {
            fail(&format!(
                "{}: kernel {name} has no STRIDE_EMU_LAUNCHER({short}) line",
                source.display()
            ));
        }
        names.push(name);
    }
    names
}

fn write_kernel_table(path: &Path, gpu: &[String], all: &[String]) {
    let mut s = String::from("// Generated by build.rs from src/cuda/*.cu.\n\n");
    s.push_str(
        "/// Every kernel of the fatbin, by the name the GPU side loads it by\n\
         /// (`extern \"C\"`, no name mangling), file by file.\n",
    );
    s.push_str("pub const KERNEL_NAMES: &[&str] = &[\n");
    for name in gpu {
        let _ = writeln!(s, "    \"{name}\",");
    }
    s.push_str("];\n\n");
    s.push_str("/// Every kernel the emulator's library holds (the emulator's self tests too).\n");
    s.push_str("pub(crate) const EMULATED: &[&str] = &[\n");
    for name in all {
        let _ = writeln!(s, "    \"{name}\",");
    }
    s.push_str("];\n\n");
    s.push_str("unsafe extern \"C\" {\n");
    for name in all {
        let launcher = name.replacen("stride_", "stride_emu_", 1);
        let _ = writeln!(
            s,
            "    fn {launcher}(launch: *const RawLaunch, args: *const RawArgs, error: *mut RawError) -> i32;"
        );
    }
    s.push_str("}\n\n");
    s.push_str("/// The emulator's launcher of the kernel `name`.\n");
    s.push_str("fn emulator_launcher(name: &str) -> Option<Launcher> {\n    match name {\n");
    for name in all {
        let launcher = name.replacen("stride_", "stride_emu_", 1);
        let _ = writeln!(s, "        \"{name}\" => Some({launcher}),");
    }
    s.push_str("        _ => None,\n    }\n}\n");
    std::fs::write(path, s)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
}

fn emulator_library(sources: &[PathBuf]) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .flag("-x")
        .flag("c++")
        // Every float operation rounded on its own, never fused into a
        // multiply-add: the emulated __fmul_rn & co. (portable.cuh) must be
        // single roundings, as they are on the GPU (ISO C++17 already
        // means `off` for g++; this says so whatever the compiler's default).
        .flag("-ffp-contract=off")
        .std("c++17")
        .opt_level(2)
        .define("STRIDE_EMU", None)
        .include("src/cuda")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .file("src/cuda/emu.cpp");
    if std::env::var_os("STRIDE_EMU_VALGRIND").is_some_and(|v| v == "1") {
        // Fiber stacks registered with Valgrind (emu.cpp), for memcheck runs.
        build.define("STRIDE_EMU_VALGRIND", None);
    }
    for source in sources {
        build.file(source);
    }
    build.compile("stride_cuda_emu");
}

/// nvcc as worker/build.rs finds it: under CUDA_ROOT, CUDA_PATH or
/// CUDA_HOME, else on PATH.
fn nvcc() -> PathBuf {
    ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"))
}

fn fatbin(out: &Path, sources: &[&PathBuf]) {
    // One translation unit of every kernel file, so that nvcc makes one
    // fatbin (it takes one input file per output).
    let unity = out.join("stride_kernels_all.cu");
    let mut text = String::from("// Generated by build.rs: every kernel file, for one fatbin.\n");
    for source in sources {
        let absolute = std::fs::canonicalize(source)
            .unwrap_or_else(|e| fail(&format!("{}: {e}", source.display())));
        let _ = writeln!(text, "#include \"{}\"", absolute.display());
    }
    std::fs::write(&unity, text)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", unity.display())));
    let fatbin = out.join("stride_kernels.fatbin");
    let log = out.join("nvcc.log");
    let nvcc = nvcc();
    let result = Command::new(&nvcc)
        .args([
            "--fatbin",
            "-gencode",
            "arch=compute_90,code=sm_90",
            "-gencode",
            "arch=compute_90,code=compute_90",
            "-O3",
            "-std=c++17",
            // Registers, spills and shared memory per kernel, into nvcc.log.
            "-Xptxas",
            "-v",
            "--Werror",
            "all-warnings",
        ])
        .arg("-Isrc/cuda")
        .arg(&unity)
        .arg("-o")
        .arg(&fatbin)
        .output();
    match result {
        Ok(o) => {
            let mut report = String::from_utf8_lossy(&o.stdout).into_owned();
            report.push_str(&String::from_utf8_lossy(&o.stderr));
            let _ = std::fs::write(&log, &report);
            if !o.status.success() {
                eprintln!("{report}");
                fail(&format!("nvcc failed on the kernels ({})", o.status));
            }
        }
        Err(e) => fail(&format!(
            "the cuda feature needs nvcc ({}: {e}): install the CUDA toolkit or set CUDA_ROOT \
             (`.ci/cuda-env.sh` sets one up)",
            nvcc.display()
        )),
    }
    let bytes = std::fs::read(&fatbin)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", fatbin.display())));
    let entries = fatbin_entries(&bytes);
    let has = |kind: u16| entries.iter().any(|e| e.kind == kind && e.arch == 90);
    if !has(FATBIN_ELF) || !has(FATBIN_PTX) {
        fail(&format!(
            "{} does not hold both sm_90 SASS and compute_90 PTX: entries {entries:?}",
            fatbin.display()
        ));
    }
}

include!("src/fatbin_format.rs");
