//! The fused engine on an NVIDIA GPU (feature `cuda`): a [`Backend`] whose
//! buffers are cudarc device buffers, whose kernels are the fatbin's
//! (`stride_cuda_kernels::gpu::Kernels`) and whose products go to cuBLASLt
//! (`gpu::Blas`). It is `emulated.rs` call for call: the same kernel on
//! the same buffers, the same products (shapes, ops, alpha, beta, types),
//! the LM head in the same chunks; activations in `S` (f32 or bf16),
//! gradients, statistics and attention's log-sum-exp in f32. Everything is
//! queued on one stream, the one the backend was made with; only
//! [`Backend::download`] and [`Backend::loss_value`] wait for the GPU.
//!
//! It must not decide anything about the model (that is `gpt.rs`'s), nor
//! own the training state (master weights, AdamW moments: the fused
//! engine's, `fused.rs`, in this backend's buffers); it runs the optimizer
//! step's kernels on them ([`Train`]).
//!
//! Decisions:
//!
//! - **Elements.** The trait names elements by their host types (f32, f64,
//!   u32, [`Bf16`](stride_cuda_kernels::Bf16)); each has `Elem::Device`,
//!   the type of the same bits in a device buffer (cudarc's `half::bf16`
//!   for `Bf16`, the type itself otherwise), and `Buf<E>` is a
//!   `CudaSlice<E::Device>`. f64 buffers compile but no kernel takes them:
//!   the backend is implemented for the `S` whose device type the kernels
//!   take ([`ComputeStorage`]: f32 and bf16), so `CudaBackend<f64>` is not a
//!   `Backend`.
//! - **Views.** A shared view is cudarc's `CudaView`. An exclusive view is
//!   a [`PartMut`]: a `CudaViewMut` and the range of it the view stands
//!   for, narrowed to a `CudaViewMut` at each launch. The plain
//!   `CudaViewMut` cannot serve: cudarc 0.19 narrows one only through
//!   `&mut self` (`slice_mut`, `split_at_mut`), so two disjoint parts that
//!   outlive the call that splits them ([`Backend::pair_mut`]: a weight's
//!   and its bias's gradients) can be split but not both cut to length.
//!   View ranges come from the engine (the parameter layout), not from
//!   outside, and out-of-range ones panic as slice indexing does on the
//!   CPU backends.
//! - **Indices.** Token ids are host data in the trait (the engine holds
//!   them there); each call that reads them uploads what its kernel takes:
//!   `gpu::Indices` for the embedding (the micro-batch) and for each chunk
//!   of the head (that chunk's targets, as `cross_entropy` takes exactly
//!   its rows' targets), `gpu::TokenBuckets` for the token embedding's
//!   backward. The GPU layer checks every id against V on the host as it
//!   uploads it, so no launch can read an unchecked index, and no device
//!   buffer of ids has to be kept in step with a host copy. The uploads
//!   are small (4 bytes a token) and stream-ordered; the buffers are freed
//!   in stream order after the launches that read them.
//! - **Loss.** [`Backend::Loss`] is a one-element f32 buffer on the device:
//!   Σ of the row losses, summed by the `column_sums` kernel (width 1) in
//!   f32, where `Emulated` sums them on the host in f64 (a relative
//!   difference of about N·2⁻²⁴ at most). The step can read its losses
//!   once, at its end ([`Backend::loss_value`]).
//! - **Errors.** Every `GpuError` and driver error becomes a
//!   [`BackendError`] with its message; shapes, lengths and ids are
//!   checked by the GPU layer before anything is launched.
//!
//! - **Training** ([`Train`]): the optimizer step as the emulated
//!   backend runs it, kernel for kernel — the sum of squares of the summed
//!   gradient, the gradient factor (averaging and the clip) and the norm
//!   left in device memory, AdamW reading the gradient through the factor,
//!   the f32 → bf16 cast refreshing the compute copy where `S` is bf16
//!   (f32 compute reads the master weights themselves: no copy). The
//!   gradient's sum over ranks goes to the collective as a device buffer
//!   (`Collective::all_reduce_device`: NCCL, in place, on its own stream;
//!   nothing to call for one rank). A step's scalars (each micro-batch's
//!   loss and the norm) are gathered on the device and read in one copy,
//!   the step's one wait. The bytes of token ids uploaded are counted
//!   ([`Train::take_uploaded`]) for the step's `host_device_bytes`.
//!
//! Not here yet: gradient buckets handed to NCCL during the backward, the
//! step as a CUDA graph (which will need the id uploads into fixed buffers
//! of the backend, outside the graph).
//!
//! Its length (~900 lines) is the `Backend` trait's: one method per kernel
//! and product, each a few lines of launch, mirroring `emulated.rs` call for
//! call; split, the two could no longer be read side by side.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DriverError,
};
use half::bf16;
use stride_cuda_kernels::gpu::{
    self, Blas, DeviceStorage, Gemm, GpuError, Indices, Kernels, Op, TokenBuckets,
};
use stride_cuda_kernels::launch::partial_blocks;
use stride_cuda_kernels::launch::sumsq_blocks;
use stride_kernels::Heads;

use super::backend::{
    AttentionSizes, Backend, BackendError, Elem, HEAD_ROWS, Train, Update, UpdateError,
};
use crate::collective::{Collective, CollectiveError};

fn gpu_err(e: GpuError) -> BackendError {
    BackendError(format!("CUDA backend: {e}"))
}

fn driver_err(what: &str) -> impl FnOnce(DriverError) -> BackendError + '_ {
    move |e| BackendError(format!("CUDA backend: {what}: {e:?}"))
}

fn heads(s: Heads) -> gpu::Heads {
    gpu::Heads {
        b: s.b,
        t: s.t,
        c: s.c,
        nh: s.nh,
    }
}

/// An exclusive view of part of a device buffer: a `CudaViewMut` and the
/// range of it the view stands for (module doc: why not a bare
/// `CudaViewMut`). Invariant: `range` lies within `whole`.
#[derive(Debug)]
pub struct PartMut<'a, T> {
    whole: CudaViewMut<'a, T>,
    range: Range<usize>,
}

impl<'a, T> PartMut<'a, T> {
    fn new(whole: CudaViewMut<'a, T>) -> PartMut<'a, T> {
        let range = 0..whole.len();
        PartMut { whole, range }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The part, exclusively, for one launch.
    pub fn get(&mut self) -> CudaViewMut<'_, T> {
        self.whole.slice_mut(self.range.clone())
    }

    /// The part, shared.
    pub fn as_view(&self) -> CudaView<'_, T> {
        self.whole.slice(self.range.clone())
    }

    /// Elements `r` of the part, exclusively; an error if `r` is not in it.
    fn at(&mut self, r: Range<usize>) -> Result<CudaViewMut<'_, T>, BackendError> {
        if r.start > r.end || r.end > self.len() {
            return Err(BackendError(format!(
                "CUDA backend: elements {r:?} of a view of {}",
                self.len()
            )));
        }
        let s = self.range.start;
        Ok(self.whole.slice_mut(s + r.start..s + r.end))
    }

    /// Elements `r` of the part as a view of their own (panics outside it,
    /// as slice indexing does).
    fn narrow(&mut self, r: Range<usize>) -> PartMut<'_, T> {
        assert!(
            r.start <= r.end && r.end <= self.len(),
            "elements {r:?} of a view of {}",
            self.len()
        );
        let s = self.range.start;
        PartMut::new(self.whole.slice_mut(s + r.start..s + r.end))
    }
}

/// What the backend needs of its activations' device type beyond the
/// kernels' [`DeviceStorage`]: how it reads f32 data in this type — the
/// operand the LM head's backward products read for the chunk's f32
/// gradient of the logits, and the weights the kernels read — as itself in
/// f32, through a bf16 copy in bf16 (`Emulated` copies the logits into `S`
/// in both cases; for f32 the copy is the identity).
pub trait ComputeStorage: DeviceStorage {
    /// Whether the head keeps a copy of a chunk of logits in this type,
    /// and the kernels read a copy of the master weights.
    const COPIES_LOGITS: bool;
    /// The weights the kernels read: the master weights themselves, or
    /// `copy` (refreshed from them by [`ComputeStorage::refresh`]).
    fn weights<'a>(
        master: CudaView<'a, f32>,
        copy: Option<CudaView<'a, Self>>,
    ) -> Result<CudaView<'a, Self>, BackendError>;
    /// copy ← master in this type (nothing where the kernels read the
    /// master weights).
    fn refresh(
        kernels: &Kernels,
        copy: &mut CudaViewMut<'_, Self>,
        master: &CudaView<'_, f32>,
    ) -> Result<(), GpuError>;
    /// `logits` as this type, converted into `copy` where needed.
    fn head_operand<'a>(
        kernels: &Kernels,
        logits: CudaView<'a, f32>,
        copy: &'a mut CudaSlice<Self>,
    ) -> Result<CudaView<'a, Self>, GpuError>;
}

impl ComputeStorage for f32 {
    const COPIES_LOGITS: bool = false;
    fn weights<'a>(
        master: CudaView<'a, f32>,
        _: Option<CudaView<'a, f32>>,
    ) -> Result<CudaView<'a, f32>, BackendError> {
        Ok(master)
    }
    fn refresh(
        _: &Kernels,
        _: &mut CudaViewMut<'_, f32>,
        _: &CudaView<'_, f32>,
    ) -> Result<(), GpuError> {
        Ok(())
    }
    fn head_operand<'a>(
        _: &Kernels,
        logits: CudaView<'a, f32>,
        _: &'a mut CudaSlice<f32>,
    ) -> Result<CudaView<'a, f32>, GpuError> {
        Ok(logits)
    }
}

impl ComputeStorage for bf16 {
    const COPIES_LOGITS: bool = true;
    fn weights<'a>(
        _: CudaView<'a, f32>,
        copy: Option<CudaView<'a, bf16>>,
    ) -> Result<CudaView<'a, bf16>, BackendError> {
        copy.ok_or_else(|| {
            BackendError("CUDA backend: bf16 compute without a bf16 copy of the weights".into())
        })
    }
    fn refresh(
        kernels: &Kernels,
        copy: &mut CudaViewMut<'_, bf16>,
        master: &CudaView<'_, f32>,
    ) -> Result<(), GpuError> {
        kernels.cast_f32_to_bf16(copy, master)
    }
    fn head_operand<'a>(
        kernels: &Kernels,
        logits: CudaView<'a, f32>,
        copy: &'a mut CudaSlice<bf16>,
    ) -> Result<CudaView<'a, bf16>, GpuError> {
        let n = logits.len();
        {
            // Too short a copy is refused by the cast's length check.
            let mut part = copy.slice_mut(..n.min(copy.len()));
            kernels.cast_f32_to_bf16(&mut part, &logits)?;
        }
        let copy: &'a CudaSlice<bf16> = copy;
        Ok(copy.slice(..n))
    }
}

/// The LM head's scratch, made by [`Backend::prepare`].
#[derive(Debug)]
struct Head<S> {
    /// One chunk of logits (rows × V), f32.
    logits: CudaSlice<f32>,
    /// The same chunk in `S`, where [`ComputeStorage::COPIES_LOGITS`] (one
    /// element otherwise).
    dlogits: CudaSlice<S>,
    /// Each row's loss of the last head call (N).
    row_loss: CudaSlice<f32>,
    /// The partial sums of the loss (`partial_blocks(N)`).
    loss_partials: CudaSlice<f32>,
}

/// See the module doc. Not `Send`: it holds a cuBLASLt handle (`gpu::Blas`).
#[derive(Debug)]
pub struct CudaBackend<S: Elem> {
    stream: Arc<CudaStream>,
    kernels: Kernels,
    blas: Blas,
    head: Option<Head<S::Device>>,
    /// The optimizer step's scratch, made by its first update.
    optimizer: Option<OptimizerScratch>,
    /// Where a step's scalars are gathered for their one read.
    gather: Option<CudaSlice<f32>>,
    /// Bytes of token ids uploaded since [`Train::take_uploaded`].
    uploaded: u64,
    storage: PhantomData<S>,
}

/// The optimizer step's device scratch, for a state of `n` parameters.
#[derive(Debug)]
struct OptimizerScratch {
    /// Σ g² of the summed gradient (one value).
    sumsq: CudaSlice<f32>,
    /// The sum of squares' partials (`sumsq_blocks(n)`).
    partials: CudaSlice<f32>,
    /// The gradient factor AdamW reads (one value).
    factor: CudaSlice<f32>,
}

impl<S: Elem> CudaBackend<S>
where
    S::Device: ComputeStorage,
{
    /// A backend on `stream`: loads the kernels' fatbin into its context
    /// and makes a cuBLASLt handle, once.
    pub fn new(stream: Arc<CudaStream>) -> Result<CudaBackend<S>, BackendError> {
        let kernels = Kernels::load(&stream).map_err(gpu_err)?;
        let blas = Blas::new(&stream).map_err(gpu_err)?;
        Ok(CudaBackend {
            stream,
            kernels,
            blas,
            head: None,
            optimizer: None,
            gather: None,
            uploaded: 0,
            storage: PhantomData,
        })
    }

    /// The stream every call is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<S: Elem> Backend for CudaBackend<S>
where
    S::Device: ComputeStorage,
{
    type A = S;
    type G = f32;
    type Buf<E: Elem> = CudaSlice<E::Device>;
    type View<'a, E: Elem> = CudaView<'a, E::Device>;
    type ViewMut<'a, E: Elem> = PartMut<'a, E::Device>;
    type Loss = CudaSlice<f32>;

    fn alloc<E: Elem>(&mut self, n: usize) -> Result<CudaSlice<E::Device>, BackendError> {
        self.stream
            .alloc_zeros::<E::Device>(n)
            .map_err(driver_err("allocating a buffer"))
    }
    fn view<E: Elem>(b: &CudaSlice<E::Device>) -> CudaView<'_, E::Device> {
        b.as_view()
    }
    fn view_mut<E: Elem>(b: &mut CudaSlice<E::Device>) -> PartMut<'_, E::Device> {
        PartMut::new(b.as_view_mut())
    }
    fn part<E: Elem>(b: &CudaSlice<E::Device>, r: Range<usize>) -> CudaView<'_, E::Device> {
        b.slice(r)
    }
    fn part_mut<E: Elem>(b: &mut CudaSlice<E::Device>, r: Range<usize>) -> PartMut<'_, E::Device> {
        PartMut::new(b.slice_mut(r))
    }
    fn sub<'a, E: Elem>(
        v: &'a CudaView<'_, E::Device>,
        r: Range<usize>,
    ) -> CudaView<'a, E::Device> {
        v.slice(r)
    }
    fn sub_mut<'a, E: Elem>(
        v: &'a mut PartMut<'_, E::Device>,
        r: Range<usize>,
    ) -> PartMut<'a, E::Device> {
        v.narrow(r)
    }
    fn pair_mut<'a, E: Elem>(
        v: &'a mut PartMut<'_, E::Device>,
        a: Range<usize>,
        b: Range<usize>,
    ) -> (PartMut<'a, E::Device>, PartMut<'a, E::Device>) {
        // Split where the later range starts; the earlier keeps its offset
        // within the lower half.
        let (first, second, swapped) = if a.end <= b.start {
            (a, b, false)
        } else {
            assert!(b.end <= a.start, "parameter ranges overlap");
            (b, a, true)
        };
        assert!(
            first.start <= first.end && second.start <= second.end && second.end <= v.len(),
            "parameter ranges {first:?}, {second:?} in a view of {}",
            v.len()
        );
        let s = v.range.start;
        let (lo, hi) = v.whole.split_at_mut(s + second.start);
        let lo = PartMut {
            whole: lo,
            range: s + first.start..s + first.end,
        };
        let hi = PartMut {
            whole: hi,
            range: 0..second.len(),
        };
        if swapped { (hi, lo) } else { (lo, hi) }
    }
    fn shared<'a, E: Elem>(v: &'a PartMut<'_, E::Device>) -> CudaView<'a, E::Device> {
        v.as_view()
    }

    fn upload<E: Elem>(
        &mut self,
        mut dst: PartMut<'_, E::Device>,
        src: &[E],
    ) -> Result<(), BackendError> {
        if dst.len() != src.len() {
            return Err(BackendError(format!(
                "CUDA backend: uploading {} elements into a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        // From pageable memory the driver stages the copy before it
        // returns, so `host` may go at the end of this call.
        if let Some(same) = E::as_device(src) {
            return self
                .stream
                .memcpy_htod(same, &mut dst.get())
                .map_err(driver_err("uploading"));
        }
        let host: Vec<E::Device> = src.iter().map(|x| x.to_device()).collect();
        self.stream
            .memcpy_htod(&host, &mut dst.get())
            .map_err(driver_err("uploading"))
    }
    fn download<E: Elem>(
        &self,
        src: CudaView<'_, E::Device>,
        dst: &mut [E],
    ) -> Result<(), BackendError> {
        if dst.len() != src.len() {
            return Err(BackendError(format!(
                "CUDA backend: downloading {} elements into a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        if dst.is_empty() {
            return Ok(());
        }
        // Straight into `dst` where it holds the device type (a DMA where
        // it is page-locked: a checkpoint's snapshot buffers).
        if let Some(same) = E::as_device_mut(dst) {
            self.stream
                .memcpy_dtoh(&src, same)
                .map_err(driver_err("downloading"))?;
            return self
                .stream
                .synchronize()
                .map_err(driver_err("waiting for a download"));
        }
        let host = self
            .stream
            .clone_dtoh(&src)
            .map_err(driver_err("downloading"))?;
        self.stream
            .synchronize()
            .map_err(driver_err("waiting for a download"))?;
        for (d, h) in dst.iter_mut().zip(host) {
            *d = E::from_device(h);
        }
        Ok(())
    }
    fn loss_value(&self, loss: &CudaSlice<f32>) -> Result<f64, BackendError> {
        let mut value = [0f32];
        self.download(loss.as_view(), &mut value)?;
        Ok(f64::from(value[0]))
    }
    fn zero<E: Elem>(&mut self, mut v: PartMut<'_, E::Device>) -> Result<(), BackendError> {
        self.stream
            .memset_zeros(&mut v.get())
            .map_err(driver_err("zeroing a buffer"))
    }

    fn prepare(&mut self, n: usize, _c: usize, v: usize) -> Result<(), BackendError> {
        let rows = HEAD_ROWS.min(n);
        let copy = if <S::Device as ComputeStorage>::COPIES_LOGITS {
            rows * v
        } else {
            1
        };
        self.head = Some(Head {
            logits: self.alloc::<f32>(rows * v)?,
            dlogits: self
                .stream
                .alloc_zeros::<S::Device>(copy)
                .map_err(driver_err("allocating the head's scratch"))?,
            row_loss: self.alloc::<f32>(n)?,
            loss_partials: self.alloc::<f32>(partial_blocks(n))?,
        });
        Ok(())
    }
    fn partials_len(n: usize, width: usize) -> usize {
        partial_blocks(n) * width
    }
    fn attention_sizes(s: Heads) -> AttentionSizes {
        // lse (B, NH, T) kept; the backward's row dots (B, NH, T) scratch.
        AttentionSizes {
            saved: s.b * s.nh * s.t,
            scratch: s.b * s.nh * s.t,
        }
    }
    fn embed_forward(
        &mut self,
        mut out: PartMut<'_, S::Device>,
        tokens: &[u32],
        wte: CudaView<'_, S::Device>,
        wpe: CudaView<'_, S::Device>,
        t: usize,
    ) -> Result<(), BackendError> {
        let c = out.len() / tokens.len().max(1);
        let ids = Indices::upload(&self.stream, tokens).map_err(gpu_err)?;
        self.uploaded += 4 * tokens.len() as u64;
        self.kernels
            .embedding_forward(&mut out.get(), &ids, &wte, &wpe, t, c)
            .map_err(gpu_err)
    }
    fn token_embedding_backward(
        &mut self,
        mut dwte: PartMut<'_, f32>,
        dout: CudaView<'_, S::Device>,
        tokens: &[u32],
        c: usize,
    ) -> Result<(), BackendError> {
        let buckets = TokenBuckets::from_tokens(&self.stream, tokens).map_err(gpu_err)?;
        // order (N), offsets (S + 1), segment tokens (S).
        self.uploaded += 4 * (buckets.rows() + 2 * buckets.segments() + 1) as u64;
        self.kernels
            .token_embedding_backward(&mut dwte.get(), &dout, &buckets, c)
            .map_err(gpu_err)
    }
    fn position_embedding_backward(
        &mut self,
        mut dwpe: PartMut<'_, f32>,
        dout: CudaView<'_, S::Device>,
        t: usize,
        c: usize,
    ) -> Result<(), BackendError> {
        self.kernels
            .position_embedding_backward(&mut dwpe.get(), &dout, t, c)
            .map_err(gpu_err)
    }
    fn layernorm_forward(
        &mut self,
        mut out: PartMut<'_, S::Device>,
        mut mean: PartMut<'_, f32>,
        mut rstd: PartMut<'_, f32>,
        x: CudaView<'_, S::Device>,
        w: CudaView<'_, S::Device>,
        b: CudaView<'_, S::Device>,
    ) -> Result<(), BackendError> {
        self.kernels
            .layernorm_forward(&mut out.get(), &mut mean.get(), &mut rstd.get(), &x, &w, &b)
            .map_err(gpu_err)
    }
    fn layernorm_backward(
        &mut self,
        mut dx: PartMut<'_, S::Device>,
        mut dw: PartMut<'_, f32>,
        mut db: PartMut<'_, f32>,
        mut partials: PartMut<'_, f32>,
        dout: CudaView<'_, S::Device>,
        x: CudaView<'_, S::Device>,
        w: CudaView<'_, S::Device>,
        mean: CudaView<'_, f32>,
        rstd: CudaView<'_, f32>,
    ) -> Result<(), BackendError> {
        self.kernels
            .layernorm_backward(
                &mut dx.get(),
                &mut dw.get(),
                &mut db.get(),
                &mut partials.get(),
                &dout,
                &x,
                &w,
                &mean,
                &rstd,
            )
            .map_err(gpu_err)
    }
    fn linear_forward(
        &mut self,
        mut out: PartMut<'_, S::Device>,
        inp: CudaView<'_, S::Device>,
        w: CudaView<'_, S::Device>,
        b: CudaView<'_, S::Device>,
        residual: Option<CudaView<'_, S::Device>>,
    ) -> Result<(), BackendError> {
        // out (N, OC) = inp (N, IC) · wᵀ + b (+ residual as C, beta 1).
        let oc = b.len();
        let ic = w.len() / oc.max(1);
        let n = inp.len() / ic.max(1);
        let mut g = Gemm::new(n, oc, ic, Op::N, Op::T);
        if residual.is_some() {
            g = g.scaled(1.0, 1.0);
        }
        self.blas
            .matmul(&g, &inp, &w, residual.as_ref(), &mut out.get(), Some(&b))
            .map_err(gpu_err)
    }
    fn linear_backward(
        &mut self,
        mut dinp: PartMut<'_, S::Device>,
        mut dw: PartMut<'_, f32>,
        mut db: PartMut<'_, f32>,
        mut partials: PartMut<'_, f32>,
        dout: CudaView<'_, S::Device>,
        inp: CudaView<'_, S::Device>,
        w: CudaView<'_, S::Device>,
    ) -> Result<(), BackendError> {
        let oc = db.len();
        let ic = w.len() / oc.max(1);
        let n = dout.len() / oc.max(1);
        // dinp (N, IC) = dout (N, OC) · w (OC, IC)
        let g = Gemm::new(n, ic, oc, Op::N, Op::N);
        self.blas
            .matmul(&g, &dout, &w, None, &mut dinp.get(), None)
            .map_err(gpu_err)?;
        // dw (OC, IC) += doutᵀ · inp, in f32
        let g = Gemm::new(oc, ic, n, Op::T, Op::N).scaled(1.0, 1.0);
        self.blas
            .matmul(&g, &dout, &inp, None, &mut dw.get(), None)
            .map_err(gpu_err)?;
        self.kernels
            .column_sums(&mut db.get(), &mut partials.get(), &dout)
            .map_err(gpu_err)
    }
    fn gelu_forward(
        &mut self,
        mut out: PartMut<'_, S::Device>,
        inp: CudaView<'_, S::Device>,
    ) -> Result<(), BackendError> {
        self.kernels
            .gelu_forward(&mut out.get(), &inp)
            .map_err(gpu_err)
    }
    fn gelu_backward(
        &mut self,
        mut d: PartMut<'_, S::Device>,
        inp: CudaView<'_, S::Device>,
    ) -> Result<(), BackendError> {
        self.kernels
            .gelu_backward(&mut d.get(), &inp)
            .map_err(gpu_err)
    }
    fn attention_forward(
        &mut self,
        mut out: PartMut<'_, S::Device>,
        mut saved: PartMut<'_, f32>,
        _scratch: PartMut<'_, f32>,
        qkv: CudaView<'_, S::Device>,
        shape: Heads,
    ) -> Result<(), BackendError> {
        let mut lse = saved.at(0..shape.b * shape.nh * shape.t)?;
        self.kernels
            .attention_forward(&mut out.get(), &mut lse, &qkv, heads(shape))
            .map_err(gpu_err)
    }
    fn attention_backward(
        &mut self,
        mut dqkv: PartMut<'_, S::Device>,
        mut scratch: PartMut<'_, f32>,
        dout: CudaView<'_, S::Device>,
        out: CudaView<'_, S::Device>,
        saved: CudaView<'_, f32>,
        qkv: CudaView<'_, S::Device>,
        shape: Heads,
    ) -> Result<(), BackendError> {
        let rows = shape.b * shape.nh * shape.t;
        let lse = saved.try_slice(..rows).ok_or_else(|| {
            BackendError(format!(
                "CUDA backend: attention saved {} values, the backward needs {rows}",
                saved.len()
            ))
        })?;
        self.kernels
            .attention_backward(
                &mut dqkv.get(),
                &mut scratch.at(0..rows)?,
                &dout,
                &out,
                &lse,
                &qkv,
                heads(shape),
            )
            .map_err(gpu_err)
    }
    fn head_cross_entropy(
        &mut self,
        x: CudaView<'_, S::Device>,
        wte: CudaView<'_, S::Device>,
        targets: &[u32],
        mut grad: Option<(PartMut<'_, S::Device>, PartMut<'_, f32>)>,
        loss_scale: f64,
        head_rows: usize,
    ) -> Result<CudaSlice<f32>, BackendError> {
        let Head {
            logits,
            dlogits,
            row_loss,
            loss_partials,
        } = self.head.as_mut().ok_or_else(|| {
            BackendError("CUDA backend: the LM head ran before Backend::prepare".into())
        })?;
        let n = targets.len();
        let c = x.len() / n.max(1);
        let v = wte.len() / c.max(1);
        if n > row_loss.len() {
            return Err(BackendError(format!(
                "CUDA backend: {n} targets, the head was prepared for {}",
                row_loss.len()
            )));
        }
        let prepared = logits.len();
        let chunk = head_rows.min(prepared / v.max(1)).max(1);
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let xr = x.try_slice(r0 * c..(r0 + rows) * c).ok_or_else(|| {
                BackendError(format!(
                    "CUDA backend: x has {} values, not {n} rows of {c}",
                    x.len()
                ))
            })?;
            let mut lg = logits.try_slice_mut(..rows * v).ok_or_else(|| {
                BackendError(format!(
                    "CUDA backend: {rows} rows of {v} logits, the head was prepared for \
                     {prepared}"
                ))
            })?;
            // logits (rows, V) = x (rows, C) · wteᵀ, in f32
            let g = Gemm::new(rows, v, c, Op::N, Op::T);
            self.blas
                .matmul(&g, &xr, &wte, None, &mut lg, None)
                .map_err(gpu_err)?;
            let ids = Indices::upload(&self.stream, &targets[r0..r0 + rows]).map_err(gpu_err)?;
            self.uploaded += 4 * rows as u64;
            self.kernels
                .cross_entropy(
                    &mut lg,
                    &mut row_loss.slice_mut(r0..r0 + rows),
                    &ids,
                    v,
                    loss_scale as f32,
                    grad.is_some(),
                )
                .map_err(gpu_err)?;
            if let Some((dx, dwte)) = grad.as_mut() {
                let dl = <S::Device as ComputeStorage>::head_operand(
                    &self.kernels,
                    lg.as_view(),
                    dlogits,
                )
                .map_err(gpu_err)?;
                // dx (rows, C) = dlogits (rows, V) · wte (V, C)
                let g = Gemm::new(rows, c, v, Op::N, Op::N);
                self.blas
                    .matmul(
                        &g,
                        &dl,
                        &wte,
                        None,
                        &mut dx.at(r0 * c..(r0 + rows) * c)?,
                        None,
                    )
                    .map_err(gpu_err)?;
                // dwte (V, C) += dlogitsᵀ · x, in f32
                let g = Gemm::new(v, c, rows, Op::T, Op::N).scaled(1.0, 1.0);
                self.blas
                    .matmul(&g, &dl, &xr, None, &mut dwte.get(), None)
                    .map_err(gpu_err)?;
            }
        }
        // Σ row losses, on the device.
        let mut loss = self
            .stream
            .alloc_zeros::<f32>(1)
            .map_err(driver_err("allocating a loss"))?;
        self.kernels
            .column_sums(&mut loss, loss_partials, &row_loss.slice(..n))
            .map_err(gpu_err)?;
        Ok(loss)
    }
}

impl<S: Elem> Train for CudaBackend<S>
where
    S::Device: ComputeStorage,
{
    const HOST_MEMORY: bool = false;
    const COPIES_WEIGHTS: bool = <S::Device as ComputeStorage>::COPIES_LOGITS;
    const DECAY_MASK: bool = true;

    fn compute_weights<'a>(
        master: &'a CudaSlice<f32>,
        copy: Option<&'a CudaSlice<S::Device>>,
    ) -> Result<CudaView<'a, S::Device>, BackendError> {
        <S::Device as ComputeStorage>::weights(master.as_view(), copy.map(CudaSlice::as_view))
    }
    fn refresh(
        &mut self,
        mut copy: PartMut<'_, S::Device>,
        master: CudaView<'_, f32>,
    ) -> Result<(), BackendError> {
        <S::Device as ComputeStorage>::refresh(&self.kernels, &mut copy.get(), &master)
            .map_err(gpu_err)
    }
    fn update(&mut self, u: Update<'_, Self>) -> Result<CudaSlice<f32>, UpdateError> {
        let Update {
            mut weights,
            mut m,
            mut v,
            grad,
            decay,
            micro_batches,
            grad_clip,
            k,
            across,
            ..
        } = u;
        let decay = decay.ok_or_else(|| {
            BackendError("CUDA backend: the AdamW kernel reads a decay mask".into())
        })?;
        let n = grad.len();
        if self
            .optimizer
            .as_ref()
            .is_none_or(|o| o.partials.len() != sumsq_blocks(n))
        {
            self.optimizer = Some(OptimizerScratch {
                sumsq: self.alloc::<f32>(1)?,
                partials: self.alloc::<f32>(sumsq_blocks(n))?,
                factor: self.alloc::<f32>(1)?,
            });
        }
        let Some(o) = self.optimizer.as_mut() else {
            return Err(BackendError("CUDA backend: no optimizer scratch".into()).into());
        };
        // The norm is the step's: a buffer of its own, read with the losses.
        let mut norm = self
            .stream
            .alloc_zeros::<f32>(1)
            .map_err(driver_err("allocating the gradient norm"))?;
        let grad = grad.as_view();
        self.kernels
            .sum_of_squares(&mut o.sumsq, &mut o.partials, &grad)
            .map_err(gpu_err)?;
        // A shard's sum of squares, summed over the ranks in place on the
        // device (NCCL's stream, ordered by cudarc's events): no host wait.
        if let Some(c) = across {
            c.all_reduce_device(&mut o.sumsq.as_view_mut())?;
        }
        self.kernels
            .grad_factor(
                &mut o.factor,
                &mut norm,
                &o.sumsq,
                1.0 / micro_batches as f64,
                grad_clip,
            )
            .map_err(gpu_err)?;
        self.kernels
            .adamw(
                &mut weights.get(),
                &mut m.get(),
                &mut v.get(),
                &grad,
                &decay,
                &o.factor,
                k.into(),
            )
            .map_err(gpu_err)?;
        Ok(norm)
    }
    fn all_reduce(
        &mut self,
        grad: &mut CudaSlice<f32>,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError> {
        // A sum over one rank is the buffer itself: nothing to call (a
        // one-GPU job, the tests' `Solo`).
        if collective.world_size() == 1 {
            return Ok(());
        }
        collective.all_reduce_device(&mut grad.as_view_mut())
    }
    fn reduce_scatter(
        &mut self,
        grad: &mut CudaSlice<f32>,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError> {
        collective.reduce_scatter_device(&mut grad.as_view_mut())
    }
    fn all_gather(
        &mut self,
        weights: &mut CudaSlice<f32>,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError> {
        collective.all_gather_device(&mut weights.as_view_mut())
    }
    fn read_scalars(
        &mut self,
        scalars: &[CudaSlice<f32>],
        out: &mut Vec<f64>,
    ) -> Result<(), BackendError> {
        let count = scalars.len();
        if count == 0 {
            return Ok(());
        }
        if let Some(long) = scalars.iter().find(|s| s.len() != 1) {
            return Err(BackendError(format!(
                "CUDA backend: a scalar of {} values",
                long.len()
            )));
        }
        if self.gather.as_ref().is_none_or(|g| g.len() < count) {
            self.gather = Some(self.alloc::<f32>(count)?);
        }
        let Some(gather) = self.gather.as_mut() else {
            return Err(BackendError("CUDA backend: no gather buffer".into()));
        };
        for (i, s) in scalars.iter().enumerate() {
            self.stream
                .memcpy_dtod(s, &mut gather.slice_mut(i..i + 1))
                .map_err(driver_err("gathering a step's scalars"))?;
        }
        let mut host = vec![0f32; count];
        self.stream
            .memcpy_dtoh(&gather.slice(..count), host.as_mut_slice())
            .map_err(driver_err("reading a step's scalars"))?;
        self.stream
            .synchronize()
            .map_err(driver_err("waiting for a step's scalars"))?;
        out.extend(host.iter().map(|x| f64::from(*x)));
        Ok(())
    }
    fn host_slice(_: &CudaSlice<f32>) -> Option<&[f32]> {
        None
    }
    fn adopt(&mut self, host: Vec<f32>) -> Result<CudaSlice<f32>, BackendError> {
        let mut buf = self.alloc::<f32>(host.len())?;
        self.upload(Self::view_mut::<f32>(&mut buf), &host)?;
        Ok(buf)
    }
    fn host_slice_mut(_: &mut CudaSlice<f32>) -> Option<&mut [f32]> {
        None
    }
    fn take_uploaded(&mut self) -> u64 {
        std::mem::take(&mut self.uploaded)
    }
}
