//! [`Blas`]: the matrix multiply of [`crate::matmul`] through cuBLASLt.
//!
//! cudarc's safe cuBLASLt wrapper (`CudaBlasLT`) cannot express the
//! contract: it computes f32 products in TF32 (`CUBLAS_COMPUTE_32F_FAST_TF32`),
//! takes one type for A, B, C and D (no bf16 operands into f32 outputs),
//! writes D over C, and panics when its workspace cannot be allocated. So
//! this module drives cuBLASLt through cudarc's thin `cublaslt::result`
//! functions, with its own descriptors:
//!
//! - compute type `CUBLAS_COMPUTE_32F` and scale type `CUDA_R_32F` for
//!   every combination: f32 accumulation, and for f32 operands true FP32
//!   (TF32 is only used under `CUBLAS_COMPUTE_32F_FAST_TF32`, which is
//!   never asked for; cuBLASLt has no math-mode switch that could turn it
//!   on behind our back, and `NVIDIA_TF32_OVERRIDE` can only turn it off);
//! - A, B of `CUDA_R_32F` or `CUDA_R_16BF`, C and D of `CUDA_R_32F` or
//!   `CUDA_R_16BF`, per [`crate::matmul::check_types`];
//! - **row-major to column-major**: cuBLASLt reads matrices column-major.
//!   A row-major r×c matrix with leading dimension ld is, read column-major,
//!   its transpose: a c×r matrix with the same ld. So the row-major
//!   D = op(A)·op(B) (m×n) is computed as the column-major
//!   Dᵀ = op(B)ᵀ·op(A)ᵀ (n×m): cuBLASLt's "A" is our B (transa = op_b,
//!   layout: B's stored width × B's stored rows, ldb), its "B" is our A
//!   (transb = op_a, layout: A's stored width × A's stored rows, lda), its
//!   m, n, k are our n, m, k, and C and D are n×m with ldc and ldd. The
//!   bias (n values, one per column of the row-major D) is cuBLASLt's bias
//!   of one value per row of Dᵀ: the `CUBLASLT_EPILOGUE_BIAS` epilogue,
//!   D = alpha·A·B + beta·C + bias, bias of D's type;
//! - C: a separate matrix (its own layout), or D itself (C = D, one layout:
//!   in place); beta = 0 does not read C;
//! - one workspace, allocated with the `Blas` (32 MiB on compute
//!   capability 9.0 and later, as NVIDIA recommends for Hopper, else
//!   4 MiB), and the smallest alignment of the four matrices' pointers
//!   given to the heuristic (so that views at any offset get an algorithm
//!   that works with them); the algorithm chosen for a shape, types and
//!   alignment is remembered.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result::{self, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceSlice};

use super::kernels::same_context;
use super::{DType, DeviceStorage, GpuError, GpuErrorKind};
use crate::matmul::{Gemm, Lens, Op};

/// cuBLASLt on one CUDA stream: [`Blas::matmul`].
///
/// Not `Send` or `Sync` (it holds a raw cuBLASLt handle): make one per
/// thread, as one per stream.
#[derive(Debug)]
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    algos: Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>>,
}

/// What an algorithm is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    dims: [usize; 7],
    ops: (Op, Op),
    types: (DType, DType),
    separate_c: bool,
    bias: bool,
    alignment: [u32; 4],
}

fn blas_error(what: &str, e: CublasError) -> GpuError {
    GpuError::new(GpuErrorKind::Blas, format!("{what}: {:?}", e.0))
}

fn data_type(t: DType) -> sys::cudaDataType {
    match t {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

/// The alignment of a device pointer in bytes, at most 256 (cuBLASLt's
/// largest requirement).
fn alignment(ptr: u64) -> u32 {
    1u32 << ptr.trailing_zeros().min(8)
}

/// A matrix layout, destroyed on drop.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    /// A column-major rows×cols matrix of `t` with leading dimension `ld`.
    fn new(t: DType, rows: usize, cols: usize, ld: usize) -> Result<Layout, GpuError> {
        // Gemm::check made sure every size fits an i64.
        let (rows, cols, ld) = (rows as u64, cols as u64, ld as i64);
        result::create_matrix_layout(data_type(t), rows, cols, ld)
            .map(Layout)
            .map_err(|e| blas_error("creating a matrix layout", e))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: made by create_matrix_layout, destroyed once, here.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

/// A matmul descriptor, destroyed on drop.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    fn set<T>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<(), GpuError> {
        // SAFETY: the descriptor is live (owned by self); the buffer is a
        // live T of size_of::<T>() bytes, which cuBLASLt copies. Every
        // caller passes the attribute's documented type: int32 for
        // TRANSA/TRANSB, the uint32 enum cublasLtEpilogue_t for EPILOGUE, a
        // device pointer (8 bytes) for BIAS_POINTER.
        unsafe {
            result::set_matmul_desc_attribute(
                self.0,
                attr,
                (value as *const T).cast(),
                size_of::<T>(),
            )
        }
        .map_err(|e| blas_error(&format!("setting {attr:?}"), e))
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: made by create_matmul_desc, destroyed once, here.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

/// A heuristic preference, destroyed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Pref {
    fn set<T>(
        &self,
        attr: sys::cublasLtMatmulPreferenceAttributes_t,
        value: &T,
    ) -> Result<(), GpuError> {
        // SAFETY: as Desc::set: a live preference, a live T of its size,
        // the documented type (uint64 for MAX_WORKSPACE_BYTES, uint32 for
        // the MIN_ALIGNMENT_*_BYTES).
        unsafe {
            result::set_matmul_pref_attribute(
                self.0,
                attr,
                (value as *const T).cast(),
                size_of::<T>(),
            )
        }
        .map_err(|e| blas_error(&format!("setting {attr:?}"), e))
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: made by create_matmul_pref, destroyed once, here.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

impl Blas {
    /// A cuBLASLt handle and its workspace for `stream`.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Blas, GpuError> {
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| GpuError::driver("binding the context", e))?;
        let major = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(|e| GpuError::driver("reading the compute capability", e))?;
        let bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| GpuError::driver("allocating cuBLASLt's workspace", e))?;
        let handle =
            result::create_handle().map_err(|e| blas_error("creating a cuBLASLt handle", e))?;
        Ok(Blas {
            handle,
            workspace,
            stream: stream.clone(),
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// The stream every matmul goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The workspace's size in bytes.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len()
    }

    /// D = alpha·op(A)·op(B) + beta·C (+ bias), the contract of
    /// [`crate::matmul`] (row-major, explicit leading dimensions), on the
    /// stream. `c`: a separate C (leading dimension `g.ldc`), or `None` for
    /// D's own values. A and B are of type `I`, C, D and the bias of type
    /// `O`; (I, O) must be (f32, f32), (bf16, bf16) or (bf16, f32).
    /// Everything is checked ([`Gemm::check`]) before cuBLASLt is called.
    pub fn matmul<I: DeviceStorage, O: DeviceStorage>(
        &self,
        g: &Gemm,
        a: &impl DevicePtr<I>,
        b: &impl DevicePtr<I>,
        c: Option<&CudaView<'_, O>>,
        d: &mut impl DevicePtrMut<O>,
        bias: Option<&CudaView<'_, O>>,
    ) -> Result<(), GpuError> {
        let lens = Lens {
            a: a.len(),
            b: b.len(),
            c: c.map(|c| c.len()),
            d: d.len(),
            bias: bias.map(|x| x.len()),
        };
        g.check(I::DTYPE, O::DTYPE, lens)
            .map_err(|e| GpuError::shape(e.to_string()))?;
        same_context(
            &self.stream,
            [a.stream(), b.stream(), d.stream()]
                .into_iter()
                .chain(c.map(|c| c.stream()))
                .chain(bias.map(|x| x.stream())),
        )?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| GpuError::driver("binding the context", e))?;

        let s = &self.stream;
        let (pa, _ra) = a.device_ptr(s);
        let (pb, _rb) = b.device_ptr(s);
        let c_ptr = c.map(|c| c.device_ptr(s));
        let bias_ptr = bias.map(|x| x.device_ptr(s));
        let (pw, _rw) = self.workspace.device_ptr(s);
        let (pd, _rd) = d.device_ptr_mut(s);
        let pc = c_ptr.as_ref().map_or(pd, |(p, _)| *p);

        // Column-major: cuBLASLt's A is our B, its B our A (module doc).
        let (ab, cd) = (I::DTYPE, O::DTYPE);
        let (a_rows, a_width) = g.a_stored();
        let (b_rows, b_width) = g.b_stored();
        let layout_a = Layout::new(ab, b_width, b_rows, g.ldb)?;
        let layout_b = Layout::new(ab, a_width, a_rows, g.lda)?;
        let layout_d = Layout::new(cd, g.n, g.m, g.ldd)?;
        let layout_c = match c {
            Some(_) => Some(Layout::new(cd, g.n, g.m, g.ldc)?),
            None => None,
        };
        let layout_c_ref = layout_c.as_ref().unwrap_or(&layout_d);

        let desc = Desc(
            result::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(|e| blas_error("creating a matmul descriptor", e))?,
        );
        let op = |o: Op| -> i32 {
            match o {
                Op::N => 0, // CUBLAS_OP_N
                Op::T => 1, // CUBLAS_OP_T
            }
        };
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &op(g.op_b),
        )?;
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &op(g.op_a),
        )?;
        let epilogue = match &bias_ptr {
            Some((p, _)) => {
                desc.set(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    p,
                )?;
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
            }
            None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
        };
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue,
        )?;

        // cuBLASLt's A, B, C, D: our B, A, C, D.
        let aligned = [alignment(pb), alignment(pa), alignment(pc), alignment(pd)];
        let key = AlgoKey {
            dims: [g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.ldd],
            ops: (g.op_a, g.op_b),
            types: (ab, cd),
            separate_c: c.is_some(),
            bias: bias.is_some(),
            alignment: aligned,
        };
        let known = self
            .algos
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .copied();
        let algo = match known {
            Some(algo) => algo,
            None => {
                let pref = Pref(
                    result::create_matmul_pref()
                        .map_err(|e| blas_error("creating a heuristic preference", e))?,
                );
                use sys::cublasLtMatmulPreferenceAttributes_t as P;
                pref.set(
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &(self.workspace.len() as u64),
                )?;
                for (attr, bytes) in [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ]
                .into_iter()
                .zip(aligned)
                {
                    pref.set(attr, &bytes)?;
                }
                // SAFETY: every descriptor is live (owned above) and
                // describes the matrices the contract checked; cuBLASLt
                // writes one heuristic result, which cudarc reads only when
                // it reports one.
                let heuristic = unsafe {
                    result::get_matmul_algo_heuristic(
                        self.handle,
                        desc.0,
                        layout_a.0,
                        layout_b.0,
                        layout_c_ref.0,
                        layout_d.0,
                        pref.0,
                    )
                }
                .map_err(|e| {
                    blas_error(
                        &format!(
                            "no cuBLASLt algorithm for {g:?} with A, B {ab:?}, C, D {cd:?}, \
                             bias {}, alignments {aligned:?} bytes",
                            bias.is_some()
                        ),
                        e,
                    )
                })?;
                self.algos
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(key, heuristic.algo);
                heuristic.algo
            }
        };

        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: the handle, descriptors and layouts are live; the layouts
        // describe the matrices as Gemm::check verified them against the
        // buffers' lengths (every element cuBLASLt reads or writes is inside
        // its buffer, the bias n long); the pointers come from cudarc
        // buffers of the stream's context (checked) borrowed for this call
        // (D mutably: it cannot alias A, B, C or the bias), whose guards
        // record the stream's accesses when they drop, after this call; the
        // algorithm was chosen for these descriptors and alignments, with at
        // most the workspace's size; alpha and beta are host f32s (the
        // default pointer mode, scale type CUDA_R_32F) read during the call.
        unsafe {
            result::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast::<c_void>(),
                (&beta as *const f32).cast::<c_void>(),
                pb as *const c_void,
                layout_a.0,
                pa as *const c_void,
                layout_b.0,
                pc as *const c_void,
                layout_c_ref.0,
                pd as *mut c_void,
                layout_d.0,
                &algo,
                pw as *mut c_void,
                self.workspace.len(),
                s.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_error(&format!("cublasLtMatmul {g:?}"), e))?;
        self.stream
            .context()
            .check_err()
            .map_err(|e| GpuError::driver("ordering the buffers' accesses", e))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: the handle was made by create_handle in Blas::new and is
        // destroyed once, here, after every matmul that used it was queued
        // (cuBLASLt releases its resources, waiting for the device where it
        // must); the workspace is freed after it, in stream order.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}
