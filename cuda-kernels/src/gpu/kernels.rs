//! [`Kernels`]: the fatbin loaded on a GPU and one safe method per kernel.
//!
//! Its length (~800 lines) is one short method per kernel (34), in the
//! order of `plan.rs`; the methods share nothing but the loaded module.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUresult};
use cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::{DeviceStorage, GpuError, GpuErrorKind, Heads, Indices, TokenBuckets};
use crate::plan::{self, Param, Plan};
use crate::{AdamWCoefficients, FATBIN, KERNEL_NAMES, NVCC_RELEASE};

/// Every kernel of [`FATBIN`], loaded on one CUDA stream's context; every
/// launch goes on that stream.
#[derive(Debug)]
pub struct Kernels {
    stream: Arc<CudaStream>,
    kernels: HashMap<&'static str, Kernel>,
}

#[derive(Debug)]
struct Kernel {
    function: CudaFunction,
    /// CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: what its registers allow.
    max_threads: u32,
    /// The dynamic shared memory it may use, once raised above 48 KiB
    /// (set once, the first time a launch needs it).
    granted: OnceLock<Result<u32, GpuError>>,
}

impl Kernel {
    /// Raises the kernel's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
    /// once, to everything the device allows a block beside the kernel's
    /// static shared memory; returns that.
    fn opt_in(&self, name: &str, stream: &CudaStream) -> Result<u32, GpuError> {
        self.granted
            .get_or_init(|| {
                let what = format!("granting {name} more than 48 KiB of shared memory");
                let ctx = stream.context();
                ctx.bind_to_thread()
                    .map_err(|e| GpuError::driver(&what, e))?;
                let device = ctx
                    .attribute(
                        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                    )
                    .map_err(|e| GpuError::driver(&what, e))?;
                let fixed = self
                    .function
                    .shared_size_bytes()
                    .map_err(|e| GpuError::driver(&what, e))?;
                let dynamic = device.saturating_sub(fixed).max(0);
                self.function
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        dynamic,
                    )
                    .map_err(|e| GpuError::driver(&what, e))?;
                Ok(dynamic.unsigned_abs())
            })
            .clone()
    }
}

/// One argument's value, kept alive for the launch that points at it.
enum Value {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Kernels {
    /// Loads [`FATBIN`] into `stream`'s context (`cuModuleLoadData` on the
    /// image: the driver picks the sm_90 SASS, or JIT-compiles the
    /// compute_90 PTX on a later GPU) and looks up every kernel of
    /// [`KERNEL_NAMES`]. A driver that cannot load the image gets an error
    /// that says what the fatbin needs and what the driver is.
    pub fn load(stream: &Arc<CudaStream>) -> Result<Kernels, GpuError> {
        let ctx = stream.context();
        // cudarc takes the image by value; the driver reads it during the
        // call and keeps its own copy.
        let image = FATBIN.to_vec();
        if image.as_ptr().align_offset(8) != 0 {
            return Err(GpuError::new(
                GpuErrorKind::Load,
                "the copy of the fatbin is not 8-byte aligned (cuModuleLoadData reads its \
                 headers as 64-bit words)",
            ));
        }
        let module = ctx
            .load_module(Ptx::from_binary(image))
            .map_err(|e| load_error(stream, e))?;
        let mut kernels = HashMap::new();
        for &name in KERNEL_NAMES {
            let function = module.load_function(name).map_err(|e| {
                if e.0 == CUresult::CUDA_ERROR_NOT_FOUND {
                    GpuError::new(
                        GpuErrorKind::Load,
                        format!("kernel {name} is not in the loaded fatbin (CUDA_ERROR_NOT_FOUND)"),
                    )
                } else {
                    GpuError::driver(&format!("looking up kernel {name}"), e)
                }
            })?;
            let max_threads = function
                .max_threads_per_block()
                .map_err(|e| GpuError::driver(&format!("reading {name}'s attributes"), e))?;
            kernels.insert(
                name,
                Kernel {
                    function,
                    max_threads: max_threads.max(0).unsigned_abs(),
                    granted: OnceLock::new(),
                },
            );
        }
        Ok(Kernels {
            stream: stream.clone(),
            kernels,
        })
    }

    /// The stream every launch goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The loaded kernel `name`, for its attributes (registers, binary
    /// version, ...); `None` if the fatbin has no such kernel.
    pub fn function(&self, name: &str) -> Option<&CudaFunction> {
        self.kernels.get(name).map(|k| &k.function)
    }

    /// The names of the loaded kernels (every one of [`KERNEL_NAMES`]).
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.kernels.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// Refuses buffers of another CUDA context than the stream's.
    fn same_context<'a>(
        &self,
        streams: impl IntoIterator<Item = &'a Arc<CudaStream>>,
    ) -> Result<(), GpuError> {
        same_context(&self.stream, streams)
    }

    /// Checks a call's plan and launches its steps with `buffers` (device
    /// pointers, in the plan's buffer order) on the stream.
    fn run(&self, plan: &Plan, buffers: &[u64]) -> Result<(), GpuError> {
        for step in plan {
            let bad_launch =
                |m: String| GpuError::new(GpuErrorKind::BadLaunch, format!("{}: {m}", step.kernel));
            step.launch.check().map_err(bad_launch)?;
            let kernel = self.kernels.get(step.kernel.as_str()).ok_or_else(|| {
                GpuError::new(
                    GpuErrorKind::Load,
                    format!("no kernel {} was loaded", step.kernel),
                )
            })?;
            if step.launch.threads() > u64::from(kernel.max_threads) {
                return Err(bad_launch(format!(
                    "{} threads per block, the compiled kernel allows {}",
                    step.launch.threads(),
                    kernel.max_threads
                )));
            }
            if step.launch.needs_shared_opt_in() {
                let granted = kernel.opt_in(&step.kernel, &self.stream)?;
                if step.launch.shared_bytes > granted {
                    return Err(bad_launch(format!(
                        "{} bytes of dynamic shared memory, the device allows it {granted}",
                        step.launch.shared_bytes
                    )));
                }
            }
            let values = step
                .params
                .iter()
                .map(|p| match *p {
                    Param::Buf(i) => buffers
                        .get(i)
                        .map(|&ptr| Value::Ptr(ptr))
                        .ok_or_else(|| bad_launch(format!("no buffer {i} in this call"))),
                    Param::I32(v) => Ok(Value::I32(v)),
                    Param::I64(v) => Ok(Value::I64(v)),
                    Param::F32(v) => Ok(Value::F32(v)),
                })
                .collect::<Result<Vec<Value>, GpuError>>()?;
            let mut args = self.stream.launch_builder(&kernel.function);
            for value in &values {
                match value {
                    Value::Ptr(v) => args.arg(v),
                    Value::I32(v) => args.arg(v),
                    Value::I64(v) => args.arg(v),
                    Value::F32(v) => args.arg(v),
                };
            }
            let [gx, gy, gz] = step.launch.grid;
            let [bx, by, bz] = step.launch.block;
            let config = LaunchConfig {
                grid_dim: (gx, gy, gz),
                block_dim: (bx, by, bz),
                shared_mem_bytes: step.launch.shared_bytes,
            };
            launch(&mut args, config)
                .map_err(|e| GpuError::driver(&format!("launching {}", step.kernel), e))?;
        }
        // Errors cudarc recorded while ordering the buffers' events.
        self.stream
            .context()
            .check_err()
            .map_err(|e| GpuError::driver("ordering the buffers' accesses", e))
    }
}

/// Submits one launch.
#[allow(unsafe_code)]
fn launch(
    args: &mut cudarc::driver::LaunchArgs<'_>,
    config: LaunchConfig,
) -> Result<(), DriverError> {
    // SAFETY: the argument list comes from the call's plan (src/plan.rs),
    // the one the emulator runs too, which checks every argument's count
    // and size against the kernel's parameters in every emulated test: one
    // 8-byte device pointer per buffer parameter, int, long long and float
    // values for the scalars. Every pointer comes from a cudarc buffer the
    // caller borrows for the call, of the stream's context (checked), and
    // the plan checked each buffer's length against the shape and every
    // index the kernel reads from a buffer (Indices, TokenBuckets keep the
    // host-checked copy) against its bound, so the kernel stays inside the
    // buffers. The values `args` points at live until after this returns.
    // The launch is asynchronous: the buffers' cudarc events (recorded when
    // the caller's guards drop, after this) and stream-ordered frees keep
    // them alive until the kernel has run.
    unsafe { args.launch(config) }.map(|_| ())
}

/// Refuses buffers whose stream is of another CUDA context than `stream`.
pub(crate) fn same_context<'a>(
    stream: &Arc<CudaStream>,
    streams: impl IntoIterator<Item = &'a Arc<CudaStream>>,
) -> Result<(), GpuError> {
    if streams.into_iter().all(|s| s.context() == stream.context()) {
        Ok(())
    } else {
        Err(GpuError::shape(
            "a buffer belongs to another CUDA context than the stream",
        ))
    }
}

/// The driver's CUDA version (cuDriverGetVersion: 1000·major + 10·minor).
#[allow(unsafe_code)]
pub(crate) fn driver_version() -> Option<i32> {
    let mut version = 0;
    // SAFETY: cuDriverGetVersion writes one int through the pointer, a
    // live local; it needs no initialised driver or context.
    let result = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    (result == CUresult::CUDA_SUCCESS).then_some(version)
}

/// `"13.2"` → 13020, cuDriverGetVersion's encoding of a CUDA release.
fn encoded_release(release: &str) -> Option<i32> {
    let mut parts = release.split('.');
    let major: i32 = parts.next()?.parse().ok()?;
    let minor: i32 = parts.next().unwrap_or("0").parse().ok()?;
    Some(1000 * major + 10 * minor)
}

/// Refuses, before any kernel is loaded, a driver that cannot JIT-compile
/// PTX from this build's nvcc ([`NVCC_RELEASE`]): the kernels `what` names
/// (Candle's and the composed engine's AdamW, which ship as PTX) would
/// fail at their first launch with CUDA_ERROR_UNSUPPORTED_PTX_VERSION. The
/// fused kernels' fatbin needs only the major version (its SASS); this
/// check is for PTX.
pub fn require_driver_for_ptx(what: &str) -> Result<(), GpuError> {
    ptx_driver_verdict(driver_version(), NVCC_RELEASE, what)
}

fn ptx_driver_verdict(driver: Option<i32>, release: &str, what: &str) -> Result<(), GpuError> {
    let (Some(have), Some(need)) = (driver, encoded_release(release)) else {
        return Ok(()); // unknown: the load itself reports what it finds
    };
    if have >= need {
        return Ok(());
    }
    Err(GpuError::new(
        GpuErrorKind::Load,
        format!(
            "the NVIDIA driver here supports CUDA {}.{} (cuDriverGetVersion = {have}), but {what} \
             are PTX made by nvcc {release}, which only a driver for CUDA {release} or newer \
             compiles: install the driver that ships with CUDA {release} (or newer), or build the \
             worker with the CUDA toolkit this driver supports (CUDA_ROOT; \
             deploy/Dockerfile.cuda's CUDA_VERSION)",
            have / 1000,
            (have % 1000) / 10
        ),
    ))
}

/// The driver branch a CUDA major version needs (NVIDIA's minimum drivers
/// for minor-version compatibility on Linux).
fn required_driver(major: &str) -> String {
    match major {
        "13" => "R580 or newer (580.65.06+)".into(),
        "12" => "R525 or newer (525.60.13+)".into(),
        "11" => "R450 or newer (450.80.02+)".into(),
        _ => format!("one that supports CUDA {major}.x"),
    }
}

/// Why the fatbin did not load, and what it needs.
fn load_error(stream: &Arc<CudaStream>, e: DriverError) -> GpuError {
    let major = NVCC_RELEASE.split('.').next().unwrap_or(NVCC_RELEASE);
    let hint = match e.0 {
        CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => format!(
            " — the driver is older than the toolkit that made the PTX: it must support CUDA \
             {NVCC_RELEASE}"
        ),
        CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU => " — nothing in the fatbin runs on this GPU: \
             it has SASS for compute capability 9.0 only and PTX for 9.0 and later"
            .into(),
        CUresult::CUDA_ERROR_INVALID_IMAGE | CUresult::CUDA_ERROR_INVALID_SOURCE => {
            " — the driver does not read this image: a driver older than the toolkit?".into()
        }
        _ => String::new(),
    };
    let driver = match driver_version() {
        Some(v) => format!(
            "this driver supports CUDA {}.{} (cuDriverGetVersion = {v})",
            v / 1000,
            (v % 1000) / 10
        ),
        None => "the driver's version could not be read".into(),
    };
    let gpu = match stream.context().compute_capability() {
        Ok((major, minor)) => format!("this GPU has compute capability {major}.{minor}"),
        Err(_) => "the GPU's compute capability could not be read".into(),
    };
    GpuError::new(
        GpuErrorKind::Load,
        format!(
            "cannot load the kernels' fatbin: {}{hint}. It holds sm_90 SASS and compute_90 PTX \
             built by nvcc {NVCC_RELEASE}: it runs from the SASS on compute capability 9.0 \
             (H100, H200) with any driver for CUDA {major}.x, which means {}; later GPUs \
             JIT-compile the PTX, which needs a driver for CUDA {NVCC_RELEASE} or newer. {driver}; \
             {gpu}.",
            super::driver_error_name(e),
            required_driver(major),
        ),
    )
}

// ---- one method per kernel, as in emu.rs ------------------------------------------------

impl Kernels {
    /// out (N, C) = wte[tokens] + wpe[position], for sequences of T
    /// positions (N = tokens.len(); position n % T). Every token must be
    /// below V = wte.len() / C.
    pub fn embedding_forward<T: DeviceStorage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        tokens: &Indices,
        wte: &impl DevicePtr<T>,
        wpe: &impl DevicePtr<T>,
        t: usize,
        c: usize,
    ) -> Result<(), GpuError> {
        let plan = plan::embedding_forward(
            T::SUFFIX,
            out.len(),
            tokens.len(),
            tokens.max(),
            wte.len(),
            wpe.len(),
            t,
            c,
        )
        .map_err(GpuError::shape)?;
        self.same_context([
            out.stream(),
            DeviceSlice::stream(tokens.data()),
            wte.stream(),
            wpe.stream(),
        ])?;
        let s = &self.stream;
        let (o, _o) = out.device_ptr_mut(s);
        let (k, _k) = tokens.data().device_ptr(s);
        let (a, _a) = wte.device_ptr(s);
        let (b, _b) = wpe.device_ptr(s);
        self.run(&plan, &[o, k, a, b])
    }

    /// dwte[token] += dout[row] for every row of dout (N, C), grouped by
    /// [`crate::bucket_tokens`] ([`TokenBuckets`]): each token's rows added
    /// in row order.
    pub fn token_embedding_backward<T: DeviceStorage>(
        &self,
        dwte: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<T>,
        buckets: &TokenBuckets,
        c: usize,
    ) -> Result<(), GpuError> {
        let plan =
            plan::token_embedding_backward(T::SUFFIX, dwte.len(), dout.len(), buckets.summary, c)
                .map_err(GpuError::shape)?;
        self.same_context([
            dwte.stream(),
            dout.stream(),
            DeviceSlice::stream(&buckets.order),
            DeviceSlice::stream(&buckets.offsets),
            DeviceSlice::stream(&buckets.segment_tokens),
        ])?;
        let s = &self.stream;
        let (w, _w) = dwte.device_ptr_mut(s);
        let (d, _d) = dout.device_ptr(s);
        let (o, _o) = buckets.order.device_ptr(s);
        let (f, _f) = buckets.offsets.device_ptr(s);
        let (g, _g) = buckets.segment_tokens.device_ptr(s);
        self.run(&plan, &[w, d, o, f, g])
    }

    /// dwpe[p] += Σ_b dout[b, p] for dout (B, T, C), sequences in order.
    pub fn position_embedding_backward<T: DeviceStorage>(
        &self,
        dwpe: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<T>,
        t: usize,
        c: usize,
    ) -> Result<(), GpuError> {
        let plan = plan::position_embedding_backward(T::SUFFIX, dwpe.len(), dout.len(), t, c)
            .map_err(GpuError::shape)?;
        self.same_context([dwpe.stream(), dout.stream()])?;
        let s = &self.stream;
        let (w, _w) = dwpe.device_ptr_mut(s);
        let (d, _d) = dout.device_ptr(s);
        self.run(&plan, &[w, d])
    }

    /// LayerNorm over rows of C = w.len() (ε = 1e-5): out (N, C) =
    /// (x − mean)·rstd·w + b, saving mean (N) and rstd (N) in f32.
    pub fn layernorm_forward<T: DeviceStorage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        mean: &mut impl DevicePtrMut<f32>,
        rstd: &mut impl DevicePtrMut<f32>,
        inp: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
    ) -> Result<(), GpuError> {
        let plan = plan::layernorm_forward(
            T::SUFFIX,
            out.len(),
            mean.len(),
            rstd.len(),
            inp.len(),
            w.len(),
            b.len(),
        )
        .map_err(GpuError::shape)?;
        self.same_context([
            out.stream(),
            mean.stream(),
            rstd.stream(),
            inp.stream(),
            w.stream(),
            b.stream(),
        ])?;
        let s = &self.stream;
        let (o, _o) = out.device_ptr_mut(s);
        let (m, _m) = mean.device_ptr_mut(s);
        let (r, _r) = rstd.device_ptr_mut(s);
        let (x, _x) = inp.device_ptr(s);
        let (ww, _ww) = w.device_ptr(s);
        let (bb, _bb) = b.device_ptr(s);
        self.run(&plan, &[o, m, r, x, ww, bb])
    }

    /// LayerNorm backward: dinp (N, C) += ∂/∂x; dw (C) += Σ norm·dout and
    /// db (C) += Σ dout over rows, through `partials` (at least
    /// [`crate::launch::partial_blocks`]`(N)` × 2C).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<T: DeviceStorage>(
        &self,
        dinp: &mut impl DevicePtrMut<T>,
        dw: &mut impl DevicePtrMut<f32>,
        db: &mut impl DevicePtrMut<f32>,
        partials: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<T>,
        inp: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        mean: &impl DevicePtr<f32>,
        rstd: &impl DevicePtr<f32>,
    ) -> Result<(), GpuError> {
        let plan = plan::layernorm_backward(
            T::SUFFIX,
            dinp.len(),
            dw.len(),
            db.len(),
            partials.len(),
            dout.len(),
            inp.len(),
            w.len(),
            mean.len(),
            rstd.len(),
        )
        .map_err(GpuError::shape)?;
        self.same_context([
            dinp.stream(),
            dw.stream(),
            db.stream(),
            partials.stream(),
            dout.stream(),
            inp.stream(),
            w.stream(),
            mean.stream(),
            rstd.stream(),
        ])?;
        let s = &self.stream;
        let (a, _a) = dinp.device_ptr_mut(s);
        let (b, _b) = dw.device_ptr_mut(s);
        let (c, _c) = db.device_ptr_mut(s);
        let (p, _p) = partials.device_ptr_mut(s);
        let (g, _g) = dout.device_ptr(s);
        let (x, _x) = inp.device_ptr(s);
        let (ww, _ww) = w.device_ptr(s);
        let (m, _m) = mean.device_ptr(s);
        let (r, _r) = rstd.device_ptr(s);
        self.run(&plan, &[a, b, c, p, g, x, ww, m, r])
    }

    /// acc (W) += Σ rows of x (N, W), through `partials` (at least
    /// [`crate::launch::partial_blocks`]`(N)` × W), the CPU's order.
    pub fn column_sums<T: DeviceStorage>(
        &self,
        acc: &mut impl DevicePtrMut<f32>,
        partials: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<T>,
    ) -> Result<(), GpuError> {
        let plan = plan::column_sums(T::SUFFIX, acc.len(), partials.len(), x.len())
            .map_err(GpuError::shape)?;
        self.same_context([acc.stream(), partials.stream(), x.stream()])?;
        let s = &self.stream;
        let (a, _a) = acc.device_ptr_mut(s);
        let (p, _p) = partials.device_ptr_mut(s);
        let (xx, _xx) = x.device_ptr(s);
        self.run(&plan, &[a, p, xx])
    }

    /// GELU (tanh form): out = x·σ(2u), u = √(2/π)(x + 0.044715x³).
    pub fn gelu_forward<T: DeviceStorage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        inp: &impl DevicePtr<T>,
    ) -> Result<(), GpuError> {
        let plan = plan::gelu("gelu_forward", T::SUFFIX, "out", out.len(), inp.len())
            .map_err(GpuError::shape)?;
        self.two(&plan, out, inp)
    }

    /// GELU backward in place: d holds dout and becomes dinp; inp is the
    /// forward's input.
    pub fn gelu_backward<T: DeviceStorage>(
        &self,
        d: &mut impl DevicePtrMut<T>,
        inp: &impl DevicePtr<T>,
    ) -> Result<(), GpuError> {
        let plan = plan::gelu("gelu_backward", T::SUFFIX, "d", d.len(), inp.len())
            .map_err(GpuError::shape)?;
        self.two(&plan, d, inp)
    }

    /// out = a + b, elementwise.
    pub fn add<T: DeviceStorage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
    ) -> Result<(), GpuError> {
        let plan = plan::add(T::SUFFIX, out.len(), a.len(), b.len()).map_err(GpuError::shape)?;
        self.same_context([out.stream(), a.stream(), b.stream()])?;
        let s = &self.stream;
        let (o, _o) = out.device_ptr_mut(s);
        let (x, _x) = a.device_ptr(s);
        let (y, _y) = b.device_ptr(s);
        self.run(&plan, &[o, x, y])
    }

    /// Causal self-attention, flash style: qkv (B, T, 3C) → out (B, T, C),
    /// lse (B, NH, T) f32.
    pub fn attention_forward<T: DeviceStorage>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        qkv: &impl DevicePtr<T>,
        s: Heads,
    ) -> Result<(), GpuError> {
        let plan = plan::attention_forward(T::SUFFIX, out.len(), lse.len(), qkv.len(), s)
            .map_err(GpuError::shape)?;
        self.same_context([out.stream(), lse.stream(), qkv.stream()])?;
        let st = &self.stream;
        let (o, _o) = out.device_ptr_mut(st);
        let (l, _l) = lse.device_ptr_mut(st);
        let (q, _q) = qkv.device_ptr(st);
        self.run(&plan, &[o, l, q])
    }

    /// Causal self-attention backward: dqkv (B, T, 3C) is overwritten from
    /// dout (B, T, C) and the forward's qkv, out and lse; dots (B, NH, T)
    /// is scratch. Three launches, no atomics.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: DeviceStorage>(
        &self,
        dqkv: &mut impl DevicePtrMut<T>,
        dots: &mut impl DevicePtrMut<f32>,
        dout: &impl DevicePtr<T>,
        out: &impl DevicePtr<T>,
        lse: &impl DevicePtr<f32>,
        qkv: &impl DevicePtr<T>,
        s: Heads,
    ) -> Result<(), GpuError> {
        let plan = plan::attention_backward(
            T::SUFFIX,
            dqkv.len(),
            dots.len(),
            dout.len(),
            out.len(),
            lse.len(),
            qkv.len(),
            s,
        )
        .map_err(GpuError::shape)?;
        self.same_context([
            dqkv.stream(),
            dots.stream(),
            dout.stream(),
            out.stream(),
            lse.stream(),
            qkv.stream(),
        ])?;
        let st = &self.stream;
        let (a, _a) = dqkv.device_ptr_mut(st);
        let (b, _b) = dots.device_ptr_mut(st);
        let (c, _c) = dout.device_ptr(st);
        let (d, _d) = out.device_ptr(st);
        let (e, _e) = lse.device_ptr(st);
        let (f, _f) = qkv.device_ptr(st);
        self.run(&plan, &[a, b, c, d, e, f])
    }

    /// Softmax cross-entropy over logits (R, V), f32, in place (as
    /// [`crate::emu::cross_entropy`]). Every target must be below V.
    pub fn cross_entropy(
        &self,
        logits: &mut impl DevicePtrMut<f32>,
        row_loss: &mut impl DevicePtrMut<f32>,
        targets: &Indices,
        v: usize,
        loss_scale: f32,
        with_grad: bool,
    ) -> Result<(), GpuError> {
        let plan = plan::cross_entropy(
            logits.len(),
            row_loss.len(),
            targets.len(),
            targets.max(),
            v,
            loss_scale,
            with_grad,
        )
        .map_err(GpuError::shape)?;
        self.same_context([
            logits.stream(),
            row_loss.stream(),
            DeviceSlice::stream(targets.data()),
        ])?;
        let s = &self.stream;
        let (l, _l) = logits.device_ptr_mut(s);
        let (r, _r) = row_loss.device_ptr_mut(s);
        let (t, _t) = targets.data().device_ptr(s);
        self.run(&plan, &[l, r, t])
    }

    /// out[0] = Σ x², through `partials` (at least
    /// [`crate::launch::sumsq_blocks`]`(N)`).
    pub fn sum_of_squares(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        partials: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<f32>,
    ) -> Result<(), GpuError> {
        let plan =
            plan::sum_of_squares(out.len(), partials.len(), x.len()).map_err(GpuError::shape)?;
        self.same_context([out.stream(), partials.stream(), x.stream()])?;
        let s = &self.stream;
        let (o, _o) = out.device_ptr_mut(s);
        let (p, _p) = partials.device_ptr_mut(s);
        let (xx, _xx) = x.device_ptr(s);
        self.run(&plan, &[o, p, xx])
    }

    /// f32 → bf16, round to nearest even.
    pub fn cast_f32_to_bf16(
        &self,
        out: &mut impl DevicePtrMut<half::bf16>,
        x: &impl DevicePtr<f32>,
    ) -> Result<(), GpuError> {
        let plan =
            plan::cast("stride_cast_f32_to_bf16", out.len(), x.len()).map_err(GpuError::shape)?;
        self.two(&plan, out, x)
    }

    /// bf16 → f32 (exact).
    pub fn cast_bf16_to_f32(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<half::bf16>,
    ) -> Result<(), GpuError> {
        let plan =
            plan::cast("stride_cast_bf16_to_f32", out.len(), x.len()).map_err(GpuError::shape)?;
        self.two(&plan, out, x)
    }

    /// One AdamW update in place of f32 master weights `w` and moments
    /// `m`, `v` (n each) with `grad` (n) scaled by `factor` (one f32 on the
    /// device, [`Kernels::grad_factor`]'s) as it is read, decay where
    /// `decay` (n bytes) is nonzero: the worker's `Coefficients::apply`
    /// operation for operation, never contracted (as
    /// [`crate::emu::adamw`], the same bits).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        w: &mut impl DevicePtrMut<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        grad: &impl DevicePtr<f32>,
        decay: &impl DevicePtr<u8>,
        factor: &impl DevicePtr<f32>,
        k: AdamWCoefficients,
    ) -> Result<(), GpuError> {
        let plan = plan::adamw(
            w.len(),
            m.len(),
            v.len(),
            grad.len(),
            decay.len(),
            factor.len(),
            k,
        )
        .map_err(GpuError::shape)?;
        self.same_context([
            w.stream(),
            m.stream(),
            v.stream(),
            grad.stream(),
            decay.stream(),
            factor.stream(),
        ])?;
        let s = &self.stream;
        let (ww, _ww) = w.device_ptr_mut(s);
        let (mm, _mm) = m.device_ptr_mut(s);
        let (vv, _vv) = v.device_ptr_mut(s);
        let (g, _g) = grad.device_ptr(s);
        let (d, _d) = decay.device_ptr(s);
        let (f, _f) = factor.device_ptr(s);
        self.run(&plan, &[ww, mm, vv, g, d, f])
    }

    /// The step's gradient factor and norm from `sumsq` (one f32, the
    /// summed gradient's [`Kernels::sum_of_squares`]), on the device (as
    /// [`crate::emu::grad_factor`]): norm = √sumsq·scale, factor = scale,
    /// times the clip when `max_norm` > 0 and norm > max_norm. Nothing
    /// waits for the GPU: [`Kernels::adamw`] reads the factor on the
    /// stream, the host reads the norm when it reads the step's results.
    pub fn grad_factor(
        &self,
        factor: &mut impl DevicePtrMut<f32>,
        norm: &mut impl DevicePtrMut<f32>,
        sumsq: &impl DevicePtr<f32>,
        scale: f64,
        max_norm: f64,
    ) -> Result<(), GpuError> {
        let plan = plan::grad_factor(factor.len(), norm.len(), sumsq.len(), scale, max_norm)
            .map_err(GpuError::shape)?;
        self.same_context([factor.stream(), norm.stream(), sumsq.stream()])?;
        let s = &self.stream;
        let (f, _f) = factor.device_ptr_mut(s);
        let (n, _n) = norm.device_ptr_mut(s);
        let (q, _q) = sumsq.device_ptr(s);
        self.run(&plan, &[f, n, q])
    }

    /// Runs a plan of two buffers: one written, one read.
    fn two<O, I>(
        &self,
        plan: &Plan,
        out: &mut impl DevicePtrMut<O>,
        inp: &impl DevicePtr<I>,
    ) -> Result<(), GpuError> {
        self.same_context([out.stream(), inp.stream()])?;
        let s = &self.stream;
        let (o, _o) = out.device_ptr_mut(s);
        let (i, _i) = inp.device_ptr(s);
        self.run(plan, &[o, i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_older_than_the_ptx_is_refused_by_name() {
        assert_eq!(encoded_release("13.2"), Some(13020));
        assert_eq!(encoded_release("12"), Some(12000));
        assert_eq!(encoded_release("x.1"), None);
        let e = ptx_driver_verdict(Some(13000), "13.2", "Candle's kernels")
            .expect_err("a CUDA 13.0 driver cannot compile 13.2's PTX");
        assert_eq!(e.kind, GpuErrorKind::Load);
        for part in [
            "supports CUDA 13.0",
            "13000",
            "Candle's kernels",
            "nvcc 13.2",
        ] {
            assert!(e.message.contains(part), "{part:?} in {}", e.message);
        }
        assert!(ptx_driver_verdict(Some(13020), "13.2", "k").is_ok());
        assert!(ptx_driver_verdict(Some(13010), "13.1", "k").is_ok());
        assert!(ptx_driver_verdict(Some(12080), "13.0", "k").is_err());
        // An unreadable version is left to the load, which names it.
        assert!(ptx_driver_verdict(None, "13.2", "k").is_ok());
    }
}
