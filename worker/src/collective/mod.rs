//! Gradient collectives: the only code in Stride that moves tensors between
//! workers, and the one home of everything a backend needs.
//!
//! [`Collective`] is the seam between the training step and the transport:
//! an in-place sum of an `f32` buffer over all ranks, its two halves
//! (reduce-scatter into each rank's shard, all-gather of the shards: what
//! a sharded optimizer needs), and a barrier. Two
//! backends implement it: [`ring::TcpRing`], a ring all-reduce over TCP
//! between worker processes (CPUs), and `nccl::Nccl` (the `cuda` feature,
//! GPUs). The job's `cluster.collective` names the backend
//! ([`CollectiveKind`], `auto` resolved by device); [`form`] builds it from
//! the worker's [`Bootstrap`] (what it opened before registering: the
//! ring's socket) and the shared id that rank 0 makes ([`new_shared_id`])
//! and the coordinator hands to every rank (the `CollectiveBootstrap`
//! exchange); [`AbortHandle`] ends a blocked call from another thread,
//! whatever the transport.
//!
//! A new backend is a file here with a `Collective` impl, a name in
//! `CollectiveKind` (`job/src/config/mod.rs`, with the devices it takes in
//! `Config::validate`), and an arm in [`new_shared_id`] and in [`form`]
//! (the compiler lists them); one that needs a socket of its own before
//! registration also opens it in [`Bootstrap::open`].

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use stride_job::config::{CollectiveKind, GradCommDtype};
use stride_proto::v1::PeerAddress;

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

use ring::RingListener;
pub use ring::{PART, TcpRing, local_ring, local_ring_with};

/// What went wrong in a collective.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    // The cause is in the message (not a `#[source]`), so that `{:#}`
    // does not print it twice.
    #[error("collective: {op} with rank {peer} failed: {error}")]
    Peer {
        op: &'static str,
        peer: usize,
        error: std::io::Error,
    },
    #[error("collective: {0}")]
    Setup(String),
}

/// Sums over all ranks; see the module doc.
pub trait Collective: std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, in place. Every rank must
    /// call it with a buffer of the same length; every rank ends with the
    /// same bits.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// The values of a buffer of `n` this rank holds summed after
    /// [`Collective::reduce_scatter_sum`] and gives everyone in
    /// [`Collective::all_gather`]: one of the [`chunk`]s of `n` — the same
    /// chunk index for every `n` (so [`sum_by_shard`] can order the
    /// ranks' values as their shards lie); the ranks' shards are disjoint
    /// and cover `0..n`. A rank keeps the optimizer state of its shard
    /// only (ZeRO-1). The default: chunk `rank`.
    fn shard(&self, n: usize) -> Range<usize> {
        chunk(n, self.world_size(), self.rank())
    }
    /// Sums `buf` over all ranks into this rank's [`Collective::shard`],
    /// with the same bits there as [`Collective::all_reduce_sum`] would
    /// give; the values outside the shard are left unspecified. Returns
    /// the shard. The default all-reduces the whole buffer.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<Range<usize>, CollectiveError> {
        self.all_reduce_sum(buf)?;
        Ok(self.shard(buf.len()))
    }
    /// Every rank's [`Collective::shard`] of `buf` to every rank: each
    /// ends with the same bits, each value the shard's owner's. The
    /// default all-reduces with the values outside the shard zeroed
    /// (exact: a value plus zeros is itself, a −0 aside, which comes back
    /// +0); a backend with a real all-gather moves half the bytes.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let mine = self.shard(buf.len());
        buf[..mine.start].fill(0.0);
        buf[mine.end..].fill(0.0);
        self.all_reduce_sum(buf)
    }
    /// A handle another thread can use to make a blocked collective call
    /// fail at once (when the coordinator aborts the step).
    fn abort_handle(&self) -> Option<AbortHandle> {
        None
    }
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = [0f32];
        self.all_reduce_sum(&mut token)
    }
    /// Element-wise sum over all ranks of `buf`, which is the values
    /// `at..at + buf.len()` of a buffer of `whole` values summed part by
    /// part (a bucket of the gradient). A backend whose summation order
    /// depends on where a value sits in the call (the ring's chunks) sums
    /// it as the unbucketed call would, by its position in the whole, so
    /// bucketing changes no bit. The default sums the part on its own.
    fn all_reduce_part(
        &mut self,
        buf: &mut [f32],
        at: usize,
        whole: usize,
    ) -> Result<(), CollectiveError> {
        let _ = (at, whole);
        self.all_reduce_sum(buf)
    }
    /// [`Collective::reduce_scatter_sum`] of `buf`, the values `at..at +
    /// buf.len()` of a buffer of `whole` (a bucket): the values of this
    /// rank's shard of the whole that lie in the part are summed, with the
    /// bits the unbucketed call gives them; the others are left
    /// unspecified. The default all-reduces the part.
    fn reduce_scatter_part(
        &mut self,
        buf: &mut [f32],
        at: usize,
        whole: usize,
    ) -> Result<(), CollectiveError> {
        self.all_reduce_part(buf, at, whole)
    }
    /// Element-wise sum over all ranks of the values `part` of the flat,
    /// contiguous f32 tensor `t` (a bucket of the device-resident step's
    /// gradient), in place on its device. The default sums a CPU tensor's
    /// own storage with [`Collective::all_reduce_part`] — no copy; a
    /// backend that can sum device memory (NCCL) overrides it.
    fn all_reduce_tensor(&mut self, t: &Tensor, part: Range<usize>) -> Result<(), CollectiveError> {
        if !t.device().is_cpu() {
            return Err(CollectiveError::Setup(format!(
                "this collective sums host memory; the gradient is on {:?} (a CUDA job uses NCCL)",
                t.device()
            )));
        }
        // The op refuses a bucket outside the tensor.
        let (whole, at) = (t.elem_count(), part.start);
        let op = InPlaceSum {
            part,
            sum: std::cell::RefCell::new(|buf: &mut [f32]| self.all_reduce_part(buf, at, whole)),
            failed: std::cell::RefCell::new(None),
        };
        let done = t.inplace_op1(&op);
        if let Some(e) = op.failed.into_inner() {
            return Err(e);
        }
        done.map_err(|e| CollectiveError::Setup(format!("in-place sum of the gradient: {e}")))
    }

    /// Element-wise sum over all ranks of `buf`, a raw CUDA buffer (the
    /// fused CUDA engine's gradient), in place on its device. Only a
    /// backend that sums device memory (NCCL) can; the default refuses,
    /// saying so. (The engine calls nothing for one rank.)
    #[cfg(feature = "cuda")]
    fn all_reduce_device(
        &mut self,
        buf: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<(), CollectiveError> {
        Err(CollectiveError::Setup(format!(
            "this collective sums host memory; the fused CUDA engine's gradient ({} values) is \
             device memory: a CUDA job sums it with NCCL",
            buf.len()
        )))
    }

    /// [`Collective::reduce_scatter_sum`] of a raw CUDA buffer, in place:
    /// this rank's [`Collective::shard`] summed (a sharded optimizer's
    /// gradient). The default sums every value
    /// ([`Collective::all_reduce_device`]).
    #[cfg(feature = "cuda")]
    fn reduce_scatter_device(
        &mut self,
        buf: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<(), CollectiveError> {
        self.all_reduce_device(buf)
    }

    /// [`Collective::all_gather`] of a raw CUDA buffer, in place (a
    /// sharded optimizer's weights). Only a backend that moves device
    /// memory (NCCL) can; the default refuses, saying so.
    #[cfg(feature = "cuda")]
    fn all_gather_device(
        &mut self,
        buf: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<(), CollectiveError> {
        Err(CollectiveError::Setup(format!(
            "this collective moves host memory; the fused CUDA engine's weights ({} values) are \
             device memory: a CUDA job gathers them with NCCL",
            buf.len()
        )))
    }
}

/// Chunk `i` of `world` of a buffer of `n` values: `i·n/world ..
/// (i+1)·n/world` — the ring's chunk bounds, the shards of a sharded
/// optimizer, and the groups a gradient's norm is summed in.
pub fn chunk(n: usize, world: usize, i: usize) -> Range<usize> {
    let world = world.max(1);
    (i * n / world)..((i + 1) * n / world)
}

/// The sum of one `f64` from each rank, added in the order of the ranks'
/// shards (chunk 0 first, from `0.0`): the same bits on every rank, and
/// the same bits as a one-rank loop `sum += x[k]` over the chunks in
/// order — the sharded optimizer's global gradient norm is the unsharded
/// one's, bit for bit. The values travel as their bits (two f32 words
/// each) in an all-gather, which moves them unchanged.
pub fn sum_by_shard(c: &mut dyn Collective, mine: f64) -> Result<f64, CollectiveError> {
    let w = c.world_size();
    if w == 1 {
        return Ok(0.0 + mine);
    }
    let mut words = vec![0f32; 2 * w];
    let at = c.shard(2 * w);
    if at.len() != 2 {
        return Err(CollectiveError::Setup(format!(
            "a shard of {:?} of a buffer of {}: shards are one chunk each",
            at,
            2 * w
        )));
    }
    let bits = mine.to_bits();
    words[at.start] = f32::from_bits(bits as u32);
    words[at.start + 1] = f32::from_bits((bits >> 32) as u32);
    c.all_gather(&mut words)?;
    Ok(words.chunks_exact(2).fold(0.0, |sum, pair| {
        sum + f64::from_bits(u64::from(pair[0].to_bits()) | u64::from(pair[1].to_bits()) << 32)
    }))
}

/// Runs a host sum on a CPU tensor's storage, in place (Candle hands the
/// storage to [`candle_core::InplaceOp1::cpu_fwd`] mutably). The sum's own
/// error is kept apart so the caller gets it unchanged (a peer's failure
/// must still name the peer).
struct InPlaceSum<F> {
    /// The values of the tensor to sum.
    part: Range<usize>,
    sum: std::cell::RefCell<F>,
    failed: std::cell::RefCell<Option<CollectiveError>>,
}

impl<F: FnMut(&mut [f32]) -> Result<(), CollectiveError>> candle_core::InplaceOp1
    for InPlaceSum<F>
{
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("the all-reduce sums f32 tensors");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the all-reduce sums contiguous tensors");
        };
        let data = &mut data[start..end];
        let Some(part) = data.get_mut(self.part.clone()) else {
            candle_core::bail!("bucket {:?} lies outside the tensor", self.part);
        };
        let result = (self.sum.borrow_mut())(part);
        if let Err(e) = result {
            *self.failed.borrow_mut() = Some(e);
            candle_core::bail!("the all-reduce failed");
        }
        Ok(())
    }
}

/// Breaks a collective's connections from another thread: a rank blocked
/// in an all-reduce on a frozen or dead peer returns an error immediately.
/// Each backend says how (the ring shuts its sockets).
pub struct AbortHandle {
    abort: Box<dyn Fn() + Send + Sync>,
}

impl AbortHandle {
    pub fn new(abort: impl Fn() + Send + Sync + 'static) -> AbortHandle {
        AbortHandle {
            abort: Box::new(abort),
        }
    }

    pub fn abort(&self) {
        (self.abort)()
    }
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AbortHandle")
    }
}

/// The collective of a one-worker job: nothing to exchange.
#[derive(Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// What a worker opens before it registers, for whichever backend a job
/// will ask of it (the job's config, and so its
/// [`CollectiveKind`], comes only with the assignment): the ring's
/// listening socket, on the address this machine uses to reach the
/// coordinator. Registration advertises [`Bootstrap::host`] and
/// [`Bootstrap::port`] (the proto's `collective_host`/`collective_port`);
/// a backend that bootstraps from the shared id alone (NCCL) ignores them.
#[derive(Debug)]
pub struct Bootstrap {
    host: IpAddr,
    ring: RingListener,
}

impl Bootstrap {
    /// Opens the bootstrap on `towards_coordinator`, the local address of
    /// a connection to the coordinator: loopback stays loopback (nothing
    /// else can reach it), any other address listens on every interface
    /// and advertises that one (a pod its pod IP).
    pub fn open(towards_coordinator: IpAddr) -> Result<Bootstrap> {
        let bind = if towards_coordinator.is_loopback() {
            towards_coordinator
        } else {
            IpAddr::from([0, 0, 0, 0])
        };
        let ring = RingListener::bind(bind)
            .with_context(|| format!("cannot open the collective's listening socket on {bind}"))?;
        Ok(Bootstrap {
            host: towards_coordinator,
            ring,
        })
    }

    /// The address peers reach this worker's collective at.
    pub fn host(&self) -> IpAddr {
        self.host
    }

    pub fn port(&self) -> u16 {
        self.ring.port()
    }
}

/// The shared id rank 0 makes for a new collective of `kind` (resolved,
/// [`CollectiveKind::on`]): NCCL's unique id, or a random nonce for the TCP
/// ring.
pub fn new_shared_id(kind: CollectiveKind) -> Result<Vec<u8>> {
    match kind {
        CollectiveKind::Nccl => nccl_unique_id(),
        CollectiveKind::Ring | CollectiveKind::Auto => Ok(stride_job::auth::generate()
            .context("cannot read random bytes for the collective id")?
            .into_bytes()),
    }
}

#[cfg(feature = "cuda")]
fn nccl_unique_id() -> Result<Vec<u8>> {
    Ok(nccl::new_unique_id()?)
}

#[cfg(not(feature = "cuda"))]
fn nccl_unique_id() -> Result<Vec<u8>> {
    Err(no_nccl())
}

#[cfg(not(feature = "cuda"))]
fn no_nccl() -> anyhow::Error {
    anyhow::anyhow!(
        "cluster.collective is nccl, and this worker was built without the `cuda` feature: build it with `--features cuda`, or run the job on CPUs"
    )
}

/// What one rank needs to form its collective of a generation.
#[derive(Debug, Clone, Copy)]
pub struct Formation<'a> {
    pub rank: usize,
    pub world: usize,
    /// Every rank's advertised collective address (its [`Bootstrap`]), in
    /// rank order.
    pub peers: &'a [PeerAddress],
    pub generation: u64,
    /// The id rank 0 made ([`new_shared_id`]), the same on every rank.
    pub shared_id: &'a [u8],
    /// How long a stalled peer may keep a call waiting.
    pub timeout: Duration,
    /// The dtype gradients cross the wire in (`train.grad_comm_dtype`;
    /// validation refused what the backend cannot carry).
    pub wire: GradCommDtype,
}

/// Forms this rank's collective of `kind` (resolved,
/// [`CollectiveKind::on`]) on `device`, from its `bootstrap`.
pub fn form(
    kind: CollectiveKind,
    device: &Device,
    bootstrap: &Bootstrap,
    f: &Formation,
) -> Result<Box<dyn Collective>> {
    let Formation {
        rank,
        world,
        peers,
        generation,
        shared_id,
        timeout,
        wire,
    } = *f;
    if peers.len() != world {
        anyhow::bail!(
            "the coordinator sent {} peer addresses for a world of {world}",
            peers.len()
        );
    }
    Ok(match kind {
        CollectiveKind::Nccl => nccl_form(device, rank, world, shared_id, timeout)?,
        CollectiveKind::Ring | CollectiveKind::Auto => {
            let peers: Vec<SocketAddr> = peers
                .iter()
                .map(|p| {
                    u16::try_from(p.port)
                        .ok()
                        .and_then(|port| (p.host.as_str(), port).to_socket_addrs().ok())
                        .and_then(|mut it| it.next())
                        .ok_or_else(|| anyhow::anyhow!("cannot resolve peer {}:{}", p.host, p.port))
                })
                .collect::<Result<_>>()?;
            bootstrap
                .ring
                .connect(rank, &peers, generation, shared_id, timeout, wire)
                .with_context(|| format!("rank {rank} could not join the ring"))?
        }
    })
}

#[cfg(feature = "cuda")]
fn nccl_form(
    device: &Device,
    rank: usize,
    world: usize,
    shared_id: &[u8],
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(
        nccl::Nccl::new(device, rank, world, shared_id, timeout)
            .with_context(|| format!("rank {rank} could not join the NCCL communicator"))?,
    ))
}

#[cfg(not(feature = "cuda"))]
fn nccl_form(_: &Device, _: usize, _: usize, _: &[u8], _: Duration) -> Result<Box<dyn Collective>> {
    Err(no_nccl())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bucket outside the gradient, or a part outside its whole, is
    /// refused before anything is sent — on every rank alike, so no rank
    /// waits for a peer that gave up.
    #[test]
    fn buckets_outside_the_buffer_are_refused() {
        let t = Tensor::zeros(10, candle_core::DType::F32, &Device::Cpu).expect("candle");
        let err = Solo.all_reduce_tensor(&t, 5..20).expect_err("past the end");
        assert!(err.to_string().contains("outside"), "{err}");
        let results = local_ring(2, |mut c| {
            let mut part = [1.0f32; 4];
            let outside = c
                .all_reduce_part(&mut part, 8, 10)
                .map_err(|e| e.to_string());
            let inside = c.all_reduce_part(&mut part, 6, 10).map(|()| part);
            (outside, inside)
        })
        .expect("ring");
        for (outside, inside) in results {
            let e = outside.expect_err("8 + 4 > 10");
            assert!(e.contains("outside"), "{e}");
            assert_eq!(
                inside.expect("a part inside"),
                [2.0; 4],
                "the ring still works after"
            );
        }
    }
}
