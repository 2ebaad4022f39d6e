//! `stride-cuda-kernels`: CUDA versions of the fused engine's kernels
//! (`stride-kernels`), written once in CUDA C++ against a small portability
//! header (`src/cuda/portable.cuh`) so that the same source compiles
//!
//! - with nvcc for H100s (`--features cuda`: one fatbin of sm_90 SASS and
//!   compute_90 PTX, [`FATBIN`], entry points [`KERNEL_NAMES`]), and
//! - with g++ for the CPU, where an emulator (`src/cuda/emu.cpp`) runs each
//!   launch — blocks one after another, a block's threads as fibers that
//!   switch at barriers and warp shuffles — so that every kernel is executed
//!   and tested on machines without a GPU ([`emu`]).
//!
//! Launch configurations are computed here, in Rust ([`launch`]), one
//! function per kernel; each call's checks, configurations and argument
//! lists are decided once (`src/plan.rs`) for both the emulator and the
//! GPU layer (`gpu`, with `--features cuda`: every kernel through cudarc on
//! a CUDA stream, and cuBLASLt). [`matmul`] holds the matrix multiply's
//! contract and its host reference. See README.md for the design, the
//! kernels, the tolerances and the limits.

mod bf16;
pub mod emu;
pub mod fatbin_format;
mod ffi;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod launch;
pub mod matmul;
mod plan;

pub use bf16::{Bf16, Storage, from_bf16, round_bf16, to_bf16};
pub use emu::bucket_tokens;
pub use ffi::KERNEL_NAMES;
pub use launch::Launch;
pub use plan::{AdamWCoefficients, Heads};
/// The limits of these kernels, as a config checks them (stride-job's
/// `cuda_shapes`, the one definition; `plan` uses the same constants).
pub use stride_job::cuda_shapes::{
    HEAD_SIZE_STEP, MAX_HEAD_ROWS, MAX_HEAD_SIZE, ModelShape, Unsupported, supports,
};

/// Whether the emulator's library holds kernel `name` (every name of
/// [`KERNEL_NAMES`] must).
pub fn emulated(name: &str) -> bool {
    ffi::EMULATED.contains(&name) && ffi::has_kernel(name)
}

#[cfg(feature = "cuda")]
mod fatbin {
    #[repr(C, align(64))]
    struct Aligned<B: ?Sized>(B);

    const ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
        env!("OUT_DIR"),
        "/stride_kernels.fatbin"
    )));

    /// Every kernel compiled by nvcc for the H100 (sm_90 SASS, and
    /// compute_90 PTX for later GPUs), one fatbin for
    /// `cuModuleLoadData`/`cuLibraryLoadData` (64-byte aligned).
    pub const FATBIN: &[u8] = &ALIGNED.0;
}

#[cfg(feature = "cuda")]
pub use fatbin::FATBIN;

/// The CUDA release of the nvcc that built [`FATBIN`] (e.g. "13.2"): the
/// driver must support this major version (gpu::Kernels::load says so
/// when it does not).
#[cfg(feature = "cuda")]
pub const NVCC_RELEASE: &str = env!("STRIDE_NVCC_RELEASE");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gpu_kernel_is_emulated_and_named_by_type() {
        assert!(!KERNEL_NAMES.is_empty());
        for name in KERNEL_NAMES {
            assert!(emulated(name), "{name} has no emulator launcher");
            assert!(
                name.ends_with("_f32") || name.ends_with("_bf16"),
                "{name}: stride_<kernel>_<f32|bf16>"
            );
            assert!(
                !name.starts_with("stride_test_"),
                "{name}: a self test in the fatbin"
            );
        }
        assert!(!emulated("stride_no_such_kernel"));
    }

    #[test]
    fn fatbin_entries_are_read_from_the_container() {
        // A container of two entries: PTX and a 3-byte "cubin" (padded to 8).
        let mut blob = Vec::new();
        let entry = |kind: u16, arch: u32, payload: &[u8]| {
            let mut e = vec![0u8; 64];
            e[..2].copy_from_slice(&kind.to_le_bytes());
            e[4..8].copy_from_slice(&64u32.to_le_bytes());
            e[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            e[28..32].copy_from_slice(&arch.to_le_bytes());
            e.extend_from_slice(payload);
            e
        };
        let body = [entry(1, 90, b"ptx."), entry(2, 90, b"elf\0\0\0\0\0")].concat();
        blob.extend_from_slice(&0xBA55_ED50u32.to_le_bytes());
        blob.extend_from_slice(&1u16.to_le_bytes());
        blob.extend_from_slice(&16u16.to_le_bytes());
        blob.extend_from_slice(&(body.len() as u64).to_le_bytes());
        blob.extend_from_slice(&body);
        let entries = fatbin_format::fatbin_entries(&blob);
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!((entries[0].kind, entries[0].arch), (1, 90));
        assert_eq!(&blob[entries[0].offset..][..4], b"ptx.");
        assert_eq!((entries[1].kind, entries[1].len), (2, 8));
        // Truncated: nothing past the end is read.
        assert!(fatbin_format::fatbin_entries(&blob[..40]).is_empty());
        assert!(fatbin_format::fatbin_entries(b"not a fatbin").is_empty());
    }

    /// The fatbin nvcc made: an sm_90 ELF cubin whose symbols name every
    /// kernel, and compute_90 PTX.
    #[cfg(feature = "cuda")]
    #[test]
    fn the_fatbin_holds_sm_90_sass_of_every_kernel_and_compute_90_ptx() {
        use fatbin_format::{FATBIN_ELF, FATBIN_PTX, fatbin_entries};
        assert_eq!(FATBIN.as_ptr() as usize % 64, 0, "aligned");
        let entries = fatbin_entries(FATBIN);
        assert!(
            entries.iter().any(|e| e.kind == FATBIN_PTX && e.arch == 90),
            "{entries:?}"
        );
        let elf = entries
            .iter()
            .find(|e| e.kind == FATBIN_ELF && e.arch == 90)
            .expect("an sm_90 cubin");
        let cubin = &FATBIN[elf.offset..elf.offset + elf.len];
        assert_eq!(&cubin[..4], b"\x7fELF", "an uncompressed ELF");
        // e_machine: EM_CUDA (190).
        assert_eq!(u16::from_le_bytes([cubin[18], cubin[19]]), 190);
        for name in KERNEL_NAMES {
            let symbol = [name.as_bytes(), b"\0"].concat();
            assert!(
                cubin.windows(symbol.len()).any(|w| w == symbol.as_slice()),
                "{name} is not in the cubin"
            );
        }
    }

    #[test]
    fn bucket_tokens_groups_rows_by_token_in_row_order() {
        let tokens = [5, 1, 5, 0, 1, 5];
        let (order, offsets, segment_tokens) = bucket_tokens(&tokens);
        assert_eq!(order, [3, 1, 4, 0, 2, 5]);
        assert_eq!(offsets, [0, 1, 3, 6]);
        assert_eq!(segment_tokens, [0, 1, 5]);
        let (order, offsets, segment_tokens) = bucket_tokens(&[]);
        assert!(order.is_empty() && segment_tokens.is_empty());
        assert_eq!(offsets, [0]);
    }
}
