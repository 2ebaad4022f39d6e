//! What the fused engine needs from a device: buffers, views of them, and
//! one call per layer and direction — the engine's forward and backward
//! (`gpt.rs`) are written once, against this trait, and run unchanged on
//! every implementation:
//!
//! - [`Cpu`]: host memory and the CPU kernels of `stride-kernels`, generic
//!   over f32 (training) and f64 (gradient checks). Everything, gradients
//!   included, in one type.
//! - `emulated::Emulated` (tests): host memory, the **CUDA kernels** of
//!   `stride-cuda-kernels` run by their CPU emulator, and the cuBLASLt
//!   product contract computed on the host — the GPU's step, call for
//!   call, short of the driver.
//! - `cuda::CudaBackend` (with the `cuda` feature): device buffers through
//!   cudarc, the same kernels from their sm_90 fatbin, cuBLASLt for the
//!   products.
//!
//! Storage types: `A` holds activations and the copy of the weights the
//! kernels read (f32, f64, or bf16 on GPUs); `G` holds what is summed or
//! must stay precise — parameter gradients, LayerNorm statistics, what
//! attention keeps for its backward, partial sums (f32 on GPUs, `A` on the
//! CPU). A backend owns whatever scratch only it needs (the LM head's
//! logits, say); the engine allocates everything else through it, once.
//!
//! Token ids (inputs and targets) are host data: each call that reads
//! them gets the host slice, and a backend whose kernels read them on a
//! device uploads them itself (the CUDA layer checks them against V as it
//! uploads them, so that a launch never reads an unchecked index).
//!
//! Training ([`Train`], `fused.rs`) asks a little more of a backend: which
//! weights its kernels read (the f32 master weights, or a bf16 copy), the
//! optimizer step on the engine's buffers, the gradient's sum over ranks,
//! and one read of a step's scalars.
//!
//! A backend never decides anything about the model: shapes and the order
//! of the layers are the engine's.

use std::fmt::Debug;
use std::ops::Range;

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use stride_cuda_kernels::Bf16;
#[cfg(feature = "cuda")]
use stride_cuda_kernels::gpu;
use stride_kernels::{self as kernels, HeadGrad, Heads, Real};

use crate::collective::sum_by_shard;
use crate::collective::{Collective, CollectiveError};
use crate::optim::{Coefficients, host_step, norm_by_chunks, sum_of_squares};

/// An element a backend's buffers hold, named by its host type.
pub trait Elem: Copy + Default + Send + Sync + Debug + 'static {
    /// The type of the same bits in a CUDA buffer (cudarc's `half::bf16`
    /// for [`Bf16`]): what the CUDA backend's buffers of this element hold.
    #[cfg(feature = "cuda")]
    type Device: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + Debug + 'static;
    /// The same bits as the device type.
    #[cfg(feature = "cuda")]
    fn to_device(self) -> Self::Device;
    /// The same bits as the host type.
    #[cfg(feature = "cuda")]
    fn from_device(x: Self::Device) -> Self;
    /// A host slice as the device type, where the two are one type (so a
    /// copy can go straight from or into it, without a converted copy).
    #[cfg(feature = "cuda")]
    fn as_device(x: &[Self]) -> Option<&[Self::Device]>;
    /// [`Elem::as_device`], exclusively.
    #[cfg(feature = "cuda")]
    fn as_device_mut(x: &mut [Self]) -> Option<&mut [Self::Device]>;
}

/// Elements a device buffer holds as they are (f64 compiles but no kernel
/// takes it: the CUDA backend's `A` is f32 or bf16).
macro_rules! same_on_device {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            #[cfg(feature = "cuda")]
            type Device = $t;
            #[cfg(feature = "cuda")]
            fn to_device(self) -> $t {
                self
            }
            #[cfg(feature = "cuda")]
            fn from_device(x: $t) -> $t {
                x
            }
            #[cfg(feature = "cuda")]
            fn as_device(x: &[$t]) -> Option<&[$t]> {
                Some(x)
            }
            #[cfg(feature = "cuda")]
            fn as_device_mut(x: &mut [$t]) -> Option<&mut [$t]> {
                Some(x)
            }
        }
    )*};
}
// u8: the optimizer's decay mask.
same_on_device!(f32, f64, u32, u8);

impl Elem for Bf16 {
    #[cfg(feature = "cuda")]
    type Device = half::bf16;
    #[cfg(feature = "cuda")]
    fn to_device(self) -> half::bf16 {
        gpu::DeviceStorage::from_host(self)
    }
    #[cfg(feature = "cuda")]
    fn from_device(x: half::bf16) -> Bf16 {
        gpu::DeviceStorage::to_host(x)
    }
    #[cfg(feature = "cuda")]
    fn as_device(_: &[Bf16]) -> Option<&[half::bf16]> {
        None
    }
    #[cfg(feature = "cuda")]
    fn as_device_mut(_: &mut [Bf16]) -> Option<&mut [half::bf16]> {
        None
    }
}

/// A backend's refusal or failure (a shape its kernels do not take, a
/// device error), with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// The sizes of what attention needs, in elements of `G`: kept from the
/// forward for the backward, and scratch (reused by every block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSizes {
    pub saved: usize,
    pub scratch: usize,
}

/// See the module doc.
pub trait Backend: Debug + Sized {
    /// Activations and the weights the kernels read.
    type A: Elem;
    /// Gradients, statistics, attention's saved state, partial sums.
    type G: Elem;
    /// An owned buffer of `E`.
    type Buf<E: Elem>: Debug + Send;
    /// A shared view of a buffer's elements.
    type View<'a, E: Elem>;
    /// An exclusive view of a buffer's elements.
    type ViewMut<'a, E: Elem>;
    /// What the loss of a micro-batch comes back as: a host number where
    /// the backend computes on the host, a value left on the device
    /// otherwise (the step reads its losses once, at its end).
    type Loss: Debug;

    /// A buffer of `n` zeros.
    fn alloc<E: Elem>(&mut self, n: usize) -> Result<Self::Buf<E>, BackendError>;
    fn view<E: Elem>(b: &Self::Buf<E>) -> Self::View<'_, E>;
    fn view_mut<E: Elem>(b: &mut Self::Buf<E>) -> Self::ViewMut<'_, E>;
    /// Part `r` of a buffer.
    fn part<E: Elem>(b: &Self::Buf<E>, r: Range<usize>) -> Self::View<'_, E>;
    /// Part `r` of a buffer, exclusively.
    fn part_mut<E: Elem>(b: &mut Self::Buf<E>, r: Range<usize>) -> Self::ViewMut<'_, E>;
    /// Part `r` of a view.
    fn sub<'a, E: Elem>(v: &'a Self::View<'_, E>, r: Range<usize>) -> Self::View<'a, E>;
    /// Part `r` of an exclusive view, for as long as that view is borrowed.
    fn sub_mut<'a, E: Elem>(
        v: &'a mut Self::ViewMut<'_, E>,
        r: Range<usize>,
    ) -> Self::ViewMut<'a, E>;
    /// Two disjoint parts of an exclusive view (a weight's and its bias's
    /// gradients in the flat gradient).
    fn pair_mut<'a, E: Elem>(
        v: &'a mut Self::ViewMut<'_, E>,
        a: Range<usize>,
        b: Range<usize>,
    ) -> (Self::ViewMut<'a, E>, Self::ViewMut<'a, E>);
    /// An exclusive view read as a shared one.
    fn shared<'a, E: Elem>(v: &'a Self::ViewMut<'_, E>) -> Self::View<'a, E>;

    /// `dst` ← `src`, from the host (weights, say); the lengths must match.
    fn upload<E: Elem>(&mut self, dst: Self::ViewMut<'_, E>, src: &[E])
    -> Result<(), BackendError>;
    /// `dst` ← `src`, to the host (gradients, say), once everything queued
    /// before has written it; the lengths must match.
    fn download<E: Elem>(&self, src: Self::View<'_, E>, dst: &mut [E]) -> Result<(), BackendError>;
    /// The value of a loss [`Backend::head_cross_entropy`] returned (on a
    /// device: waits for it).
    fn loss_value(&self, loss: &Self::Loss) -> Result<f64, BackendError>;
    /// `v` ← 0.
    fn zero<E: Elem>(&mut self, v: Self::ViewMut<'_, E>) -> Result<(), BackendError>;

    /// Scratch only this backend needs, for micro-batches of `n` rows of
    /// a model of width `c` and vocabulary `v`; called once.
    fn prepare(&mut self, n: usize, c: usize, v: usize) -> Result<(), BackendError>;
    /// The length of a column-sum partials buffer for `n` rows of `width`.
    fn partials_len(n: usize, width: usize) -> usize;
    /// What attention keeps and uses as scratch, for `shape`.
    fn attention_sizes(shape: Heads) -> AttentionSizes;

    /// out (N, C) = wte[tokens] + wpe[position], sequences of `t`.
    fn embed_forward(
        &mut self,
        out: Self::ViewMut<'_, Self::A>,
        tokens: &[u32],
        wte: Self::View<'_, Self::A>,
        wpe: Self::View<'_, Self::A>,
        t: usize,
    ) -> Result<(), BackendError>;
    /// dwte[tokens[n]] += dout[n] for every row.
    fn token_embedding_backward(
        &mut self,
        dwte: Self::ViewMut<'_, Self::G>,
        dout: Self::View<'_, Self::A>,
        tokens: &[u32],
        c: usize,
    ) -> Result<(), BackendError>;
    /// dwpe[p] += Σ over sequences of dout[b, p].
    fn position_embedding_backward(
        &mut self,
        dwpe: Self::ViewMut<'_, Self::G>,
        dout: Self::View<'_, Self::A>,
        t: usize,
        c: usize,
    ) -> Result<(), BackendError>;
    /// LayerNorm of rows of C = w.len(), keeping mean and 1/σ.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &mut self,
        out: Self::ViewMut<'_, Self::A>,
        mean: Self::ViewMut<'_, Self::G>,
        rstd: Self::ViewMut<'_, Self::G>,
        x: Self::View<'_, Self::A>,
        w: Self::View<'_, Self::A>,
        b: Self::View<'_, Self::A>,
    ) -> Result<(), BackendError>;
    /// dx += ∂/∂x; dw, db += the gain's and bias's gradients.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &mut self,
        dx: Self::ViewMut<'_, Self::A>,
        dw: Self::ViewMut<'_, Self::G>,
        db: Self::ViewMut<'_, Self::G>,
        partials: Self::ViewMut<'_, Self::G>,
        dout: Self::View<'_, Self::A>,
        x: Self::View<'_, Self::A>,
        w: Self::View<'_, Self::A>,
        mean: Self::View<'_, Self::G>,
        rstd: Self::View<'_, Self::G>,
    ) -> Result<(), BackendError>;
    /// out (N, OC) = inp (N, IC) · wᵀ + b (+ residual); w is (OC, IC).
    fn linear_forward(
        &mut self,
        out: Self::ViewMut<'_, Self::A>,
        inp: Self::View<'_, Self::A>,
        w: Self::View<'_, Self::A>,
        b: Self::View<'_, Self::A>,
        residual: Option<Self::View<'_, Self::A>>,
    ) -> Result<(), BackendError>;
    /// dinp ← dout · w; dw += doutᵀ · inp; db += Σ rows of dout.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &mut self,
        dinp: Self::ViewMut<'_, Self::A>,
        dw: Self::ViewMut<'_, Self::G>,
        db: Self::ViewMut<'_, Self::G>,
        partials: Self::ViewMut<'_, Self::G>,
        dout: Self::View<'_, Self::A>,
        inp: Self::View<'_, Self::A>,
        w: Self::View<'_, Self::A>,
    ) -> Result<(), BackendError>;
    /// GELU (tanh form).
    fn gelu_forward(
        &mut self,
        out: Self::ViewMut<'_, Self::A>,
        inp: Self::View<'_, Self::A>,
    ) -> Result<(), BackendError>;
    /// GELU backward in place: d holds dout and becomes dinp.
    fn gelu_backward(
        &mut self,
        d: Self::ViewMut<'_, Self::A>,
        inp: Self::View<'_, Self::A>,
    ) -> Result<(), BackendError>;
    /// Causal self-attention: qkv (B, T, 3C) → out (B, T, C), keeping
    /// `saved` for the backward ([`Backend::attention_sizes`]).
    fn attention_forward(
        &mut self,
        out: Self::ViewMut<'_, Self::A>,
        saved: Self::ViewMut<'_, Self::G>,
        scratch: Self::ViewMut<'_, Self::G>,
        qkv: Self::View<'_, Self::A>,
        shape: Heads,
    ) -> Result<(), BackendError>;
    /// Causal self-attention backward: dqkv (B, T, 3C) overwritten from
    /// dout and the forward's qkv, out and saved state.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &mut self,
        dqkv: Self::ViewMut<'_, Self::A>,
        scratch: Self::ViewMut<'_, Self::G>,
        dout: Self::View<'_, Self::A>,
        out: Self::View<'_, Self::A>,
        saved: Self::View<'_, Self::G>,
        qkv: Self::View<'_, Self::A>,
        shape: Heads,
    ) -> Result<(), BackendError>;
    /// The tied LM head and the cross-entropy of `targets` (N rows; x the
    /// final LayerNorm's output, wte the token embedding), in chunks of
    /// `head_rows` rows so that the (N, V) logits never exist. With
    /// `grad`, dx is overwritten with ∂loss/∂x and ∂loss/∂wte added into
    /// dwte, for the loss `loss_scale · Σ row losses`. Returns Σ row
    /// losses. (`grad` is (dx, dwte): a pair rather than a struct, which
    /// would need the backend's views in a type of its own.)
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn head_cross_entropy(
        &mut self,
        x: Self::View<'_, Self::A>,
        wte: Self::View<'_, Self::A>,
        targets: &[u32],
        grad: Option<(Self::ViewMut<'_, Self::A>, Self::ViewMut<'_, Self::G>)>,
        loss_scale: f64,
        head_rows: usize,
    ) -> Result<Self::Loss, BackendError>;
}

/// What the fused engine's training state (`fused.rs`) needs from a
/// backend beyond the model's layers: which weights the kernels read, the
/// optimizer step, the gradient's sum over ranks, and the one read of a
/// step's scalars. The state itself (f32 master weights, gradient and
/// moments, the decay mask, the compute copy) is the engine's, held in the
/// backend's buffers; the backend runs the calls on them and decides
/// nothing.
///
/// - [`Cpu<f32>`]: host buffers; the kernels read the master weights
///   themselves; averaging, clipping (an f64 norm) and AdamW are the host
///   loops of `crate::optim` — the CPU worker's bits.
/// - `emulated::Emulated` (tests) and `cuda::CudaBackend`: the optimizer
///   kernels of `stride-cuda-kernels` — the sum of squares, the gradient
///   factor (averaging and the clip, left in device memory), AdamW reading
///   the gradient through that factor — and, where `A` is bf16, the f32 →
///   bf16 refresh of the compute copy.
pub trait Train: Backend<G = f32> {
    /// Whether the buffers are host memory, so that nothing crosses a link
    /// (no transfer is counted).
    const HOST_MEMORY: bool;
    /// Whether the kernels read a copy of the master weights in `A` (bf16),
    /// refreshed after every update, rather than the f32 master weights.
    const COPIES_WEIGHTS: bool;
    /// Whether the update reads the decay mask (a byte a parameter) rather
    /// than [`Update::decay_ranges`].
    const DECAY_MASK: bool;

    /// The weights the kernels read: the compute copy where
    /// [`Train::COPIES_WEIGHTS`] (an error without one), else the master
    /// weights.
    fn compute_weights<'a>(
        master: &'a Self::Buf<f32>,
        copy: Option<&'a Self::Buf<Self::A>>,
    ) -> Result<Self::View<'a, Self::A>, BackendError>;
    /// copy ← master, rounded to `A` (called where [`Train::COPIES_WEIGHTS`]).
    fn refresh(
        &mut self,
        copy: Self::ViewMut<'_, Self::A>,
        master: Self::View<'_, f32>,
    ) -> Result<(), BackendError>;
    /// One optimizer step (see [`Update`]); returns the global gradient
    /// norm before clipping, a value the step reads with its losses
    /// ([`Train::read_scalars`]).
    fn update(&mut self, u: Update<'_, Self>) -> Result<Self::Loss, UpdateError>;
    /// The gradient summed over all ranks, in place: the step's one
    /// exchange between ranks.
    fn all_reduce(
        &mut self,
        grad: &mut Self::Buf<f32>,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError>;
    /// The gradient summed over all ranks into this rank's shard
    /// ([`Collective::reduce_scatter_sum`]; a sharded optimizer's).
    fn reduce_scatter(
        &mut self,
        grad: &mut Self::Buf<f32>,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError>;
    /// Every rank's shard of the weights to every rank
    /// ([`Collective::all_gather`]; a sharded optimizer's).
    fn all_gather(
        &mut self,
        weights: &mut Self::Buf<f32>,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError>;
    /// The values of `scalars` (a step's losses and its norm) appended to
    /// `out`, with one wait for the device.
    fn read_scalars(
        &mut self,
        scalars: &[Self::Loss],
        out: &mut Vec<f64>,
    ) -> Result<(), BackendError>;
    /// A buffer's values as a host slice, where buffers are host memory
    /// (hashed in place, say).
    fn host_slice(b: &Self::Buf<f32>) -> Option<&[f32]>;
    /// [`Train::host_slice`], exclusively (a checkpoint is read straight
    /// into it).
    fn host_slice_mut(b: &mut Self::Buf<f32>) -> Option<&mut [f32]>;
    /// A buffer holding `host` (the initial master weights): host memory
    /// takes the vector as it is, a device copies it.
    fn adopt(&mut self, host: Vec<f32>) -> Result<Self::Buf<f32>, BackendError>;
    /// Bytes of token ids copied to the device since the last call (none
    /// for host memory).
    fn take_uploaded(&mut self) -> u64 {
        0
    }
}

/// One optimizer step's operands, in the backend's views: the gradient
/// summed over this step's micro-batches on every rank is averaged over
/// `micro_batches`, clipped to a global norm of `grad_clip` (0: no
/// clipping) and applied by AdamW with the coefficients `k` (the update's
/// number and learning rate folded in), decaying the matrices.
pub struct Update<'a, B: Backend> {
    /// f32 master weights, updated in place.
    pub weights: B::ViewMut<'a, f32>,
    /// First moments.
    pub m: B::ViewMut<'a, f32>,
    /// Second moments.
    pub v: B::ViewMut<'a, f32>,
    /// The summed gradient (the host backend scales it in place; the
    /// device kernels read it through the gradient factor).
    pub grad: B::ViewMut<'a, f32>,
    /// 1 where weight decay applies ([`Train::DECAY_MASK`] backends).
    pub decay: Option<B::View<'a, u8>>,
    /// The same as `(offset, len)` ranges: the host loop's form.
    pub decay_ranges: &'a [(usize, usize)],
    /// Micro-batches over all ranks: the average is the sum over this.
    pub micro_batches: usize,
    /// The largest global norm (0: no clipping).
    pub grad_clip: f64,
    pub k: Coefficients,
    /// Ranks in the job: the host backend sums the norm's squares by
    /// chunk of this many ([`crate::optim::norm_by_chunks`]), the bits a
    /// sharded step gets; a device backend sums them its own way.
    pub world: usize,
    /// A sharded optimizer's step: the operands are this rank's shard, and
    /// the sum of the gradient's squares is summed over the ranks through
    /// this collective (the host's f64 sums in shard order,
    /// [`crate::collective::sum_by_shard`]; a device's f32 sum in place,
    /// without a host wait) before the norm is taken. `None`: the whole
    /// gradient is here.
    pub across: Option<&'a mut dyn Collective>,
}

/// Why an optimizer step failed: its backend, or the collective that sums
/// a sharded step's norm (kept apart, so that a peer's failure still names
/// the peer).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

impl<B: Backend> Debug for Update<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Update")
            .field("micro_batches", &self.micro_batches)
            .field("grad_clip", &self.grad_clip)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// The parts of [`Train`] every backend whose memory is the host's shares
/// (the gradient summed in its host buffer, scalars that are host numbers),
/// written once for [`Cpu`] and the tests' emulated CUDA backend.
macro_rules! host_train {
    () => {
        const HOST_MEMORY: bool = true;
        fn all_reduce(
            &mut self,
            grad: &mut Vec<f32>,
            collective: &mut dyn crate::collective::Collective,
        ) -> Result<(), crate::collective::CollectiveError> {
            collective.all_reduce_sum(grad)
        }
        fn reduce_scatter(
            &mut self,
            grad: &mut Vec<f32>,
            collective: &mut dyn crate::collective::Collective,
        ) -> Result<(), crate::collective::CollectiveError> {
            collective.reduce_scatter_sum(grad).map(drop)
        }
        fn all_gather(
            &mut self,
            weights: &mut Vec<f32>,
            collective: &mut dyn crate::collective::Collective,
        ) -> Result<(), crate::collective::CollectiveError> {
            collective.all_gather(weights)
        }
        fn read_scalars(
            &mut self,
            scalars: &[f64],
            out: &mut Vec<f64>,
        ) -> Result<(), BackendError> {
            out.extend_from_slice(scalars);
            Ok(())
        }
        fn host_slice(b: &Vec<f32>) -> Option<&[f32]> {
            Some(b)
        }
        fn adopt(&mut self, host: Vec<f32>) -> Result<Vec<f32>, BackendError> {
            Ok(host)
        }
        fn host_slice_mut(b: &mut Vec<f32>) -> Option<&mut [f32]> {
            Some(b)
        }
    };
}
#[cfg(test)]
pub(super) use host_train;

/// The host and the CPU kernels of `stride-kernels`, everything in `T`.
#[derive(Debug, Default)]
pub struct Cpu<T> {
    /// The LM head's logits, `head_rows` rows at a time.
    logits: Vec<T>,
    /// Each row's loss of the last head call (a test reads one).
    row_loss: Vec<f64>,
}

impl<T: Real> Cpu<T> {
    /// The row losses of the last [`Backend::head_cross_entropy`].
    pub fn row_losses(&self) -> &[f64] {
        &self.row_loss
    }
}

/// The buffers, views and copies of a backend whose memory is the host's
/// (`Vec`s and slices; the loss a host number): [`Cpu`] and the tests'
/// emulated CUDA backend, written once.
macro_rules! host_memory {
    () => {
        type Buf<E: Elem> = Vec<E>;
        type View<'a, E: Elem> = &'a [E];
        type ViewMut<'a, E: Elem> = &'a mut [E];
        type Loss = f64;

        fn alloc<E: Elem>(&mut self, n: usize) -> Result<Vec<E>, BackendError> {
            Ok(vec![E::default(); n])
        }
        fn view<E: Elem>(b: &Vec<E>) -> &[E] {
            b
        }
        fn view_mut<E: Elem>(b: &mut Vec<E>) -> &mut [E] {
            b
        }
        fn part<E: Elem>(b: &Vec<E>, r: Range<usize>) -> &[E] {
            &b[r]
        }
        fn part_mut<E: Elem>(b: &mut Vec<E>, r: Range<usize>) -> &mut [E] {
            &mut b[r]
        }
        fn sub<'a, E: Elem>(v: &'a &[E], r: Range<usize>) -> &'a [E] {
            &v[r]
        }
        fn sub_mut<'a, E: Elem>(v: &'a mut &mut [E], r: Range<usize>) -> &'a mut [E] {
            &mut v[r]
        }
        fn pair_mut<'a, E: Elem>(
            v: &'a mut &mut [E],
            a: Range<usize>,
            b: Range<usize>,
        ) -> (&'a mut [E], &'a mut [E]) {
            pair(v, &a, &b)
        }
        fn shared<'a, E: Elem>(v: &'a &mut [E]) -> &'a [E] {
            v
        }
        fn upload<E: Elem>(&mut self, dst: &mut [E], src: &[E]) -> Result<(), BackendError> {
            host_copy(dst, src)
        }
        fn download<E: Elem>(&self, src: &[E], dst: &mut [E]) -> Result<(), BackendError> {
            host_copy(dst, src)
        }
        fn loss_value(&self, loss: &f64) -> Result<f64, BackendError> {
            Ok(*loss)
        }
        fn zero<E: Elem>(&mut self, v: &mut [E]) -> Result<(), BackendError> {
            v.fill(E::default());
            Ok(())
        }
    };
}
#[cfg(test)]
pub(super) use host_memory;

/// `Ok` for the CPU kernels, which cannot fail once the engine has checked
/// the shapes.
const OK: Result<(), BackendError> = Ok(());

impl<T: Real + Elem> Backend for Cpu<T> {
    type A = T;
    type G = T;
    host_memory!();
    fn prepare(&mut self, n: usize, _c: usize, v: usize) -> Result<(), BackendError> {
        self.logits = vec![T::zero(); HEAD_ROWS.min(n) * v];
        self.row_loss = vec![0.0; n];
        OK
    }
    fn partials_len(n: usize, width: usize) -> usize {
        kernels::blocks(n) * width
    }
    fn attention_sizes(s: Heads) -> AttentionSizes {
        let (b, t, c, nh) = (s.b, s.t, s.c, s.nh);
        AttentionSizes {
            // The softmax probabilities (B, NH, T, T).
            saved: b * nh * t * t,
            // heads (B, NH, T, hs), dheads (B, NH, 3, T, hs), datt (B, NH, T, T).
            scratch: b * t * c + 3 * b * t * c + b * nh * t * t,
        }
    }
    fn embed_forward(
        &mut self,
        out: &mut [T],
        tokens: &[u32],
        wte: &[T],
        wpe: &[T],
        t: usize,
    ) -> Result<(), BackendError> {
        kernels::embed_forward(out, tokens, wte, wpe, t);
        OK
    }
    fn token_embedding_backward(
        &mut self,
        dwte: &mut [T],
        dout: &[T],
        tokens: &[u32],
        c: usize,
    ) -> Result<(), BackendError> {
        kernels::token_embedding_backward(dwte, dout, tokens, c);
        OK
    }
    fn position_embedding_backward(
        &mut self,
        dwpe: &mut [T],
        dout: &[T],
        t: usize,
        c: usize,
    ) -> Result<(), BackendError> {
        kernels::position_embedding_backward(dwpe, dout, t, c);
        OK
    }
    fn layernorm_forward(
        &mut self,
        out: &mut [T],
        mean: &mut [T],
        rstd: &mut [T],
        x: &[T],
        w: &[T],
        b: &[T],
    ) -> Result<(), BackendError> {
        kernels::layernorm_forward(out, mean, rstd, x, w, b);
        OK
    }
    fn layernorm_backward(
        &mut self,
        dx: &mut [T],
        dw: &mut [T],
        db: &mut [T],
        partials: &mut [T],
        dout: &[T],
        x: &[T],
        w: &[T],
        mean: &[T],
        rstd: &[T],
    ) -> Result<(), BackendError> {
        kernels::layernorm_backward(dx, dw, db, partials, dout, x, w, mean, rstd);
        OK
    }
    fn linear_forward(
        &mut self,
        out: &mut [T],
        inp: &[T],
        w: &[T],
        b: &[T],
        residual: Option<&[T]>,
    ) -> Result<(), BackendError> {
        kernels::linear_forward(out, inp, w, b, residual);
        OK
    }
    fn linear_backward(
        &mut self,
        dinp: &mut [T],
        dw: &mut [T],
        db: &mut [T],
        partials: &mut [T],
        dout: &[T],
        inp: &[T],
        w: &[T],
    ) -> Result<(), BackendError> {
        kernels::linear_backward(Some(dinp), dw, db, partials, dout, inp, w);
        OK
    }
    fn gelu_forward(&mut self, out: &mut [T], inp: &[T]) -> Result<(), BackendError> {
        kernels::gelu_forward(out, inp);
        OK
    }
    fn gelu_backward(&mut self, d: &mut [T], inp: &[T]) -> Result<(), BackendError> {
        kernels::gelu_backward(d, inp);
        OK
    }
    fn attention_forward(
        &mut self,
        out: &mut [T],
        saved: &mut [T],
        scratch: &mut [T],
        qkv: &[T],
        shape: Heads,
    ) -> Result<(), BackendError> {
        let heads = &mut scratch[..shape.b * shape.t * shape.c];
        kernels::attention_forward(out, saved, heads, qkv, shape);
        OK
    }
    fn attention_backward(
        &mut self,
        dqkv: &mut [T],
        scratch: &mut [T],
        dout: &[T],
        _out: &[T],
        saved: &[T],
        qkv: &[T],
        shape: Heads,
    ) -> Result<(), BackendError> {
        let n = shape.b * shape.t * shape.c;
        let (heads, rest) = scratch.split_at_mut(n);
        let (dheads, datt) = rest.split_at_mut(3 * n);
        let datt = &mut datt[..shape.b * shape.nh * shape.t * shape.t];
        kernels::attention_backward(dqkv, datt, heads, dheads, dout, saved, qkv, shape);
        OK
    }
    fn head_cross_entropy(
        &mut self,
        x: &[T],
        wte: &[T],
        targets: &[u32],
        grad: Option<(&mut [T], &mut [T])>,
        loss_scale: f64,
        head_rows: usize,
    ) -> Result<f64, BackendError> {
        let v = wte.len() / (x.len() / targets.len().max(1)).max(1);
        let rows = head_rows.min(self.logits.len() / v.max(1)).max(1);
        let grad = grad.map(|(dx, dwte)| HeadGrad { dx, dwte });
        Ok(kernels::head_cross_entropy(
            x,
            wte,
            targets,
            &mut self.logits[..rows * v],
            &mut self.row_loss,
            grad,
            T::of(loss_scale),
        ))
    }
}

/// The CPU worker's step: the host loops of `crate::optim`, as the trainer
/// ran them before the engine owned its state (the same operations in the
/// same order: the same bits).
impl Train for Cpu<f32> {
    const COPIES_WEIGHTS: bool = false;
    const DECAY_MASK: bool = false;
    host_train!();

    fn compute_weights<'a>(
        master: &'a Vec<f32>,
        _copy: Option<&'a Vec<f32>>,
    ) -> Result<&'a [f32], BackendError> {
        Ok(master)
    }
    fn refresh(&mut self, _copy: &mut [f32], _master: &[f32]) -> Result<(), BackendError> {
        OK
    }
    fn update(&mut self, u: Update<'_, Self>) -> Result<f64, UpdateError> {
        let (world, across) = (u.world, u.across);
        Ok(host_step(
            &u.k,
            u.weights,
            u.m,
            u.v,
            u.grad,
            u.decay_ranges,
            u.micro_batches,
            u.grad_clip,
            |g| match across {
                None => Ok(norm_by_chunks(g, world)),
                Some(c) => sum_by_shard(c, sum_of_squares(g)).map(f64::sqrt),
            },
        )?)
    }
}

/// Rows of logits the LM head computes at once. 256 × 50,304 f32 is 51 MB:
/// large enough that the embedding-gradient product (whose k is this) runs
/// near full speed, small next to the (B·T, V) logits it replaces.
pub const HEAD_ROWS: usize = 256;

// The CUDA kernels' limits (`stride_cuda_kernels::supports`) hold for
// chunks of at most this many rows.
const _: () = assert!(HEAD_ROWS <= stride_cuda_kernels::MAX_HEAD_ROWS);

/// `dst` ← `src` on the host, refusing different lengths.
pub fn host_copy<E: Copy>(dst: &mut [E], src: &[E]) -> Result<(), BackendError> {
    if dst.len() != src.len() {
        return Err(BackendError(format!(
            "copying {} elements into a buffer of {}",
            src.len(),
            dst.len()
        )));
    }
    dst.copy_from_slice(src);
    OK
}

/// Two disjoint ranges of one slice, both mutable.
pub fn pair<'a, T>(
    g: &'a mut [T],
    a: &Range<usize>,
    b: &Range<usize>,
) -> (&'a mut [T], &'a mut [T]) {
    if a.end <= b.start {
        let (lo, hi) = g.split_at_mut(b.start);
        (&mut lo[a.clone()], &mut hi[..b.len()])
    } else {
        assert!(b.end <= a.start, "parameter ranges overlap");
        let (lo, hi) = g.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b.clone()])
    }
}
