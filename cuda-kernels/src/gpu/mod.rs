//! The GPU side (feature `cuda`): every kernel of [`crate::FATBIN`] on an
//! NVIDIA GPU through cudarc ([`Kernels`]), and the matrix multiply of
//! [`crate::matmul`] through cuBLASLt ([`Blas`]).
//!
//! - [`Kernels::load`] loads the fatbin (the module image, through
//!   `cuModuleLoadData`: no PTX JIT on an sm_90 GPU, no NVRTC) on a
//!   [`CudaStream`] and looks up every name of [`crate::KERNEL_NAMES`]; a
//!   driver that cannot load it is an error that says which driver the
//!   fatbin needs and which one is there.
//! - One method per kernel, mirroring [`crate::emu`]: the same arguments
//!   (device buffers — [`CudaSlice`] or views — for the host slices), the
//!   same checks and the same launch configurations (both take them from
//!   one plan per call, `src/plan.rs`). Every launch goes on the stream
//!   `Kernels` was loaded on; nothing waits for the GPU.
//! - Index buffers (tokens, targets, token buckets) are uploaded through
//!   [`Indices`] and [`TokenBuckets`], which check the indices on the host
//!   as they upload them and keep the device copy out of reach of writes,
//!   so that a launch can check them against V without reading the GPU.
//! - Storage types: `f32` and cudarc's `half::bf16` ([`DeviceStorage`]),
//!   the kernels' 16-bit layout; [`DeviceStorage::Host`] is the host type
//!   the emulator takes (f32, [`Bf16`]).
//!
//! Errors are [`GpuError`]s; nothing panics on bad input.

mod blas;
mod kernels;

use std::fmt;
use std::sync::Arc;

use cudarc::driver::result::DriverError;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr, ValidAsZeroBits};

pub use blas::Blas;
/// The `half` crate of cudarc's bf16 (`half::bf16`, a device storage
/// type), for users of this layer that do not depend on it themselves.
pub use half;
pub use kernels::{Kernels, require_driver_for_ptx};

pub use crate::matmul::{DType, Gemm, Op};
use crate::plan;
pub use crate::plan::Heads;
use crate::{Bf16, Storage};

/// What kind of thing went wrong on the GPU side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuErrorKind {
    /// A buffer or argument does not match the shape (found before
    /// launching), or a type combination is not supported.
    Shape,
    /// The launch configuration does not fit the kernel or the GPU.
    BadLaunch,
    /// The fatbin or one of its kernels could not be loaded.
    Load,
    /// The CUDA driver returned an error.
    Driver,
    /// cuBLASLt returned an error.
    Blas,
}

/// An error of the GPU layer, with a message that says what and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuError {
    /// The kind of failure.
    pub kind: GpuErrorKind,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for GpuError {}

impl GpuError {
    pub(crate) fn new(kind: GpuErrorKind, message: impl Into<String>) -> GpuError {
        GpuError {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn shape(message: impl Into<String>) -> GpuError {
        GpuError::new(GpuErrorKind::Shape, message)
    }

    /// A driver error while doing `what`, with the driver's name for it.
    pub(crate) fn driver(what: &str, e: DriverError) -> GpuError {
        GpuError::new(
            GpuErrorKind::Driver,
            format!("{what}: {}", driver_error_name(e)),
        )
    }
}

/// "CUDA_ERROR_X (the driver's description)", or the code where the
/// driver cannot name it.
pub(crate) fn driver_error_name(e: DriverError) -> String {
    let name = e.error_name().map(|n| n.to_string_lossy().into_owned());
    let text = e.error_string().map(|n| n.to_string_lossy().into_owned());
    match (name, text) {
        (Ok(name), Ok(text)) => format!("{name} ({text})"),
        _ => format!("{:?}", e.0),
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// The storage types of device buffers: `f32` and `half::bf16` (cudarc's,
/// with its `f16` feature: 2 bytes, the 16 high bits of an f32, as the
/// kernels' `bf16`).
pub trait DeviceStorage:
    sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + fmt::Debug + 'static
{
    /// The host type of the same bits, as the emulator takes it.
    type Host: Storage;
    /// The suffix of the kernels' names: `f32` or `bf16`.
    const SUFFIX: &'static str;
    /// The element type, as [`crate::matmul`] names it.
    const DTYPE: DType;
    /// The same bits from the host type.
    fn from_host(x: Self::Host) -> Self;
    /// The same bits as the host type.
    fn to_host(self) -> Self::Host;
}

impl DeviceStorage for f32 {
    type Host = f32;
    const SUFFIX: &'static str = "f32";
    const DTYPE: DType = DType::F32;
    fn from_host(x: f32) -> f32 {
        x
    }
    fn to_host(self) -> f32 {
        self
    }
}

impl DeviceStorage for half::bf16 {
    type Host = Bf16;
    const SUFFIX: &'static str = "bf16";
    const DTYPE: DType = DType::Bf16;
    fn from_host(x: Bf16) -> half::bf16 {
        half::bf16::from_bits(x.0)
    }
    fn to_host(self) -> Bf16 {
        Bf16(self.to_bits())
    }
}

/// The most bytes of device memory `stream`'s context has had allocated at
/// once from its device's current memory pool since the context began
/// (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`): where cudarc allocates stream-ordered
/// (`cuMemAllocAsync`, on every GPU that has pools, an H100 included),
/// that is every buffer cudarc, Candle and this layer allocate — a peak
/// that a later read of the free memory (`cuMemGetInfo`) cannot see once
/// the pool has given transient buffers back. `None` where the context
/// does not allocate from pools.
#[allow(unsafe_code)]
pub fn pool_peak_bytes(stream: &CudaStream) -> Result<Option<u64>, GpuError> {
    use cudarc::driver::{result, sys};
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    let what = "reading the memory pool's high-water mark";
    ctx.bind_to_thread()
        .map_err(|e| GpuError::driver(what, e))?;
    // SAFETY: `cu_device` is the context's own device, as cuDeviceGet gave it.
    let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }
        .map_err(|e| GpuError::driver(what, e))?;
    let mut bytes: u64 = 0;
    // SAFETY: `pool` is the device's current pool; USED_MEM_HIGH is a
    // cuuint64_t, which `bytes` is, alive for the call.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&raw mut bytes).cast(),
        )
    }
    .result()
    .map_err(|e| GpuError::driver(what, e))?;
    Ok(Some(bytes))
}

/// `host` on the device, at least one element long (an empty buffer still
/// gets a valid allocation; its users are told the real length).
fn upload_padded(stream: &Arc<CudaStream>, host: &[u32]) -> Result<CudaSlice<u32>, GpuError> {
    let data = if host.is_empty() {
        stream.clone_htod(&[0u32][..])
    } else {
        stream.clone_htod(host)
    };
    data.map_err(|e| GpuError::driver("uploading indices", e))
}

/// A buffer of indices (tokens, targets) on the device, checked on the host
/// as it was uploaded: the launches that read it know its largest index
/// without reading the GPU, and nothing can write it afterwards.
#[derive(Debug)]
pub struct Indices {
    data: CudaSlice<u32>,
    len: usize,
    max: Option<u32>,
}

impl Indices {
    /// Uploads `host` on `stream` (asynchronously: the host slice is staged
    /// before this returns).
    pub fn upload(stream: &Arc<CudaStream>, host: &[u32]) -> Result<Indices, GpuError> {
        Ok(Indices {
            data: upload_padded(stream, host)?,
            len: host.len(),
            max: plan::max_index(host),
        })
    }

    /// The number of indices.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The largest index (`None` when empty).
    pub fn max(&self) -> Option<u32> {
        self.max
    }

    /// The indices on the device, read-only.
    pub fn device(&self) -> CudaView<'_, u32> {
        self.data.slice(..self.len)
    }

    pub(crate) fn data(&self) -> &CudaSlice<u32> {
        &self.data
    }
}

/// The token-embedding backward's row buckets ([`crate::bucket_tokens`]) on
/// the device, checked on the host as they were uploaded (offsets rising
/// from 0 to N, rows below N, segment tokens strictly increasing).
#[derive(Debug)]
pub struct TokenBuckets {
    order: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    segment_tokens: CudaSlice<u32>,
    summary: plan::Buckets,
}

impl TokenBuckets {
    /// Checks and uploads buckets made by [`crate::bucket_tokens`] (or
    /// equivalent).
    pub fn upload(
        stream: &Arc<CudaStream>,
        order: &[u32],
        offsets: &[u32],
        segment_tokens: &[u32],
    ) -> Result<TokenBuckets, GpuError> {
        let summary = plan::buckets(order, offsets, segment_tokens).map_err(GpuError::shape)?;
        Ok(TokenBuckets {
            order: upload_padded(stream, order)?,
            offsets: upload_padded(stream, offsets)?,
            segment_tokens: upload_padded(stream, segment_tokens)?,
            summary,
        })
    }

    /// Buckets the rows of `tokens` and uploads them.
    pub fn from_tokens(stream: &Arc<CudaStream>, tokens: &[u32]) -> Result<TokenBuckets, GpuError> {
        let (order, offsets, segment_tokens) = crate::bucket_tokens(tokens);
        TokenBuckets::upload(stream, &order, &offsets, &segment_tokens)
    }

    /// N: the rows bucketed.
    pub fn rows(&self) -> usize {
        self.summary.rows
    }

    /// S: the segments (distinct tokens).
    pub fn segments(&self) -> usize {
        self.summary.segments
    }
}
