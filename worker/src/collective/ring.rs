//! The TCP ring: the CPU backend of [`Collective`], a ring all-reduce over
//! TCP between worker processes (NCCL takes its place on GPUs). Peer
//! addresses come from the coordinator; each worker listens on port 0 and
//! reports the port it got.
//!
//! Determinism: the ring splits the buffer into `world` chunks with fixed
//! bounds and sums each chunk in ring order, so for a given world size the
//! result is the same bits on every rank and in every run. A bucket of a
//! larger buffer (`all_reduce_part`) keeps the whole buffer's chunk bounds,
//! so every value is summed in the same order whether the buffer goes in
//! one call or bucket by bucket: bucketing changes no bit. The data is sent
//! as native-endian `f32` (all supported targets are little-endian), or,
//! with `train.grad_comm_dtype = "bf16"`, rounded to bf16 (nearest even)
//! for the wire and added in f32 on arrival: half the bytes, one rounding
//! of each partial sum per hop. Every rank still ends with the same bits:
//! the rank that finishes a chunk's sum rounds it in place as it sends it
//! on, so it keeps exactly what the others receive.
//!
//! Speed: one thread drives both sockets, non-blocking, through one `mio`
//! poll. Each chunk travels in parts of [`PART`] values, sent straight from
//! the caller's buffer and received straight into it (or, while reducing,
//! into one part of scratch that is added at once), so sending, receiving
//! and adding overlap and a part of round s+1 leaves as soon as the same
//! part of round s has arrived — no copies of the buffer, no threads per
//! call.
//!
//! A peer that stops sending or receiving for the collective's timeout
//! turns into an error naming it instead of a hang; an [`AbortHandle`]
//! ends a blocked call at once.
//!
//! Every collective of a generation is formed from one shared id that rank
//! 0 makes and the coordinator hands to every rank (the `CollectiveBootstrap`
//! exchange): NCCL's unique id on GPUs (`super::nccl`), a random nonce for the
//! ring, whose handshake carries its hash so that only ranks of the same
//! formation connect to each other.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use half::bf16;
use stride_job::config::GradCommDtype;

use super::{AbortHandle, Collective, CollectiveError, Solo};

/// Values per part of a chunk: the unit of pipelining (1 MiB of f32).
/// Measured on loopback (BENCHMARKS.md): 64 K values ran ~10 % slower,
/// 1 M values about the same; smaller parts pipeline small buffers better.
pub const PART: usize = 256 * 1024;
/// Magic bytes opening a ring connection ("STRD").
const HELLO: [u8; 4] = *b"STRD";
/// Magic, rank (u32), generation (u64), hash of the shared id (u64).
const HELLO_LEN: usize = 24;

/// Where one call's buffer lies in the buffer it is a part of (a bucket in
/// the gradient): `n` values at `at` of `whole`.
#[derive(Debug, Clone, Copy)]
struct Part {
    at: usize,
    n: usize,
    whole: usize,
}

/// A bound, not yet connected, ring endpoint.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Listens on `host`, port 0 (the OS picks a free port).
    pub fn bind(host: IpAddr) -> std::io::Result<RingListener> {
        Ok(RingListener {
            listener: TcpListener::bind(SocketAddr::new(host, 0))?,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Joins the ring: connects to rank + 1 and accepts rank − 1 (both
    /// introduce themselves with their rank, the job generation and the hash
    /// of the formation's shared id, so a stale connection from an aborted
    /// generation, or one from another job, is refused).
    pub fn connect(
        &self,
        rank: usize,
        peers: &[SocketAddr],
        generation: u64,
        shared_id: &[u8],
        timeout: Duration,
        wire: GradCommDtype,
    ) -> Result<Box<dyn Collective>, CollectiveError> {
        let id_hash = xxhash_rust::xxh3::xxh3_64(shared_id);
        let world = peers.len();
        if rank >= world {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} outside a world of {world}"
            )));
        }
        if world == 1 {
            return Ok(Box::new(Solo));
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        let peer_err = |op, peer, error| CollectiveError::Peer { op, peer, error };

        // Outgoing: the listener of the next rank was bound before it
        // registered, so connecting succeeds even before it accepts.
        let next = loop {
            match TcpStream::connect_timeout(&peers[next_rank], Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(peer_err("connect", next_rank, e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        configure(&next, timeout).map_err(|e| peer_err("configure", next_rank, e))?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(&HELLO);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&generation.to_le_bytes());
        hello.extend_from_slice(&id_hash.to_le_bytes());
        (&next)
            .write_all(&hello)
            .map_err(|e| peer_err("handshake", next_rank, e))?;

        // Incoming: accept until the previous rank of this generation calls.
        self.listener
            .set_nonblocking(true)
            .map_err(|e| CollectiveError::Setup(e.to_string()))?;
        let prev = loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| peer_err("accept", prev_rank, e))?;
                    configure(&s, timeout).map_err(|e| peer_err("configure", prev_rank, e))?;
                    let mut buf = [0u8; HELLO_LEN];
                    if (&s).read_exact(&mut buf).is_err() {
                        continue;
                    }
                    let from = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                    let gen_bytes: [u8; 8] = buf[8..16].try_into().unwrap_or_default();
                    let id_bytes: [u8; 8] = buf[16..24].try_into().unwrap_or_default();
                    if buf[..4] == HELLO
                        && from == prev_rank
                        && u64::from_le_bytes(gen_bytes) == generation
                        && u64::from_le_bytes(id_bytes) == id_hash
                    {
                        break s;
                    }
                    tracing::warn!(
                        from,
                        "refused a ring connection from another rank, generation or job"
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(peer_err(
                            "accept",
                            prev_rank,
                            std::io::Error::new(
                                ErrorKind::TimedOut,
                                "the previous rank never connected",
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(peer_err("accept", prev_rank, e)),
            }
        };
        Ok(Box::new(TcpRing::new(
            rank, world, next, prev, timeout, wire,
        )?))
    }
}

fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

const NEXT: Token = Token(0);
const PREV: Token = Token(1);

/// Ring all-reduce over TCP; see the module doc.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// To rank + 1 (non-blocking).
    next: mio::net::TcpStream,
    /// From rank − 1 (non-blocking).
    prev: mio::net::TcpStream,
    poll: Poll,
    events: Events,
    /// Blocking handles of the same two sockets, for [`AbortHandle`].
    handles: [TcpStream; 2],
    /// How long a peer may make no progress before the call fails.
    timeout: Duration,
    /// One part, received while reducing.
    scratch: Vec<f32>,
    /// The dtype on the wire.
    wire: GradCommDtype,
    /// One part as bf16 bits, sent and received (a bf16 wire only).
    send_bits: Vec<u16>,
    recv_bits: Vec<u16>,
}

impl TcpRing {
    fn new(
        rank: usize,
        world: usize,
        next: TcpStream,
        prev: TcpStream,
        timeout: Duration,
        wire: GradCommDtype,
    ) -> Result<TcpRing, CollectiveError> {
        let setup = |e: std::io::Error| CollectiveError::Setup(e.to_string());
        let handles = [
            next.try_clone().map_err(setup)?,
            prev.try_clone().map_err(setup)?,
        ];
        next.set_nonblocking(true).map_err(setup)?;
        prev.set_nonblocking(true).map_err(setup)?;
        let mut next = mio::net::TcpStream::from_std(next);
        let mut prev = mio::net::TcpStream::from_std(prev);
        let poll = Poll::new().map_err(setup)?;
        poll.registry()
            .register(&mut next, NEXT, Interest::WRITABLE)
            .map_err(setup)?;
        poll.registry()
            .register(&mut prev, PREV, Interest::READABLE)
            .map_err(setup)?;
        Ok(TcpRing {
            rank,
            world,
            next,
            prev,
            poll,
            events: Events::with_capacity(4),
            handles,
            timeout,
            scratch: vec![0.0; PART],
            wire,
            send_bits: match wire {
                GradCommDtype::F32 => Vec::new(),
                GradCommDtype::Bf16 => vec![0; PART],
            },
            recv_bits: match wire {
                GradCommDtype::F32 => Vec::new(),
                GradCommDtype::Bf16 => vec![0; PART],
            },
        })
    }

    /// Bounds of chunk `i` (mod world) of the call's part `at..at + n` of
    /// a buffer of `whole` values, relative to the part: the chunk's
    /// bounds are the whole buffer's, so a value is reduced in the same
    /// ring order whatever part it is summed in. Empty where the chunk
    /// misses the part.
    fn chunk(&self, p: Part, i: usize) -> Range<usize> {
        let c = super::chunk(p.whole, self.world, i % self.world);
        let (lo, hi) = (
            c.start.clamp(p.at, p.at + p.n),
            c.end.clamp(p.at, p.at + p.n),
        );
        (lo - p.at)..(hi - p.at)
    }

    /// Bounds of segment `i` of the sending (`send`) or receiving side:
    /// part `i % parts` of the chunk moved in round `i / parts`. Rounds
    /// 0..world−1 reduce-scatter (rank r sends chunk r − s and adds chunk
    /// r − s − 1), the rest all-gather (it sends chunk r + 1 − s' and
    /// receives chunk r − s'); each round sends what the previous one
    /// received.
    fn segment(&self, p: Part, parts: usize, i: usize, send: bool) -> Range<usize> {
        let (round, part) = (i / parts, i % parts);
        let (w, r) = (self.world, self.rank);
        let chunk = if round < w - 1 {
            r + 2 * w - round - usize::from(!send)
        } else {
            let s = round - (w - 1);
            r + 2 * w + 1 - s - usize::from(!send)
        };
        let c = self.chunk(p, chunk);
        let len = c.len();
        (c.start + part * len / parts)..(c.start + (part + 1) * len / parts)
    }

    fn peer_error(&self, op: &'static str, source: std::io::Error) -> CollectiveError {
        let peer = match op {
            "send" => (self.rank + 1) % self.world,
            _ => (self.rank + self.world - 1) % self.world,
        };
        CollectiveError::Peer {
            op,
            peer,
            error: source,
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn abort_handle(&self) -> Option<AbortHandle> {
        let streams: Vec<TcpStream> = self
            .handles
            .iter()
            .filter_map(|s| s.try_clone().ok())
            .collect();
        Some(AbortHandle::new(move || {
            for s in &streams {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }))
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_part(buf, 0, buf.len())
    }

    /// Chunk r + 1 of the whole buffer: the one the reduce-scatter rounds
    /// leave fully summed on rank r (each round adds the chunk it receives
    /// to its own and passes it on; after w − 1 rounds rank r has added
    /// the last contribution to chunk r + 1).
    fn shard(&self, n: usize) -> Range<usize> {
        self.chunk(Part { at: 0, n, whole: n }, self.rank + 1)
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<Range<usize>, CollectiveError> {
        let n = buf.len();
        self.reduce_scatter_part(buf, 0, n)?;
        Ok(self.shard(n))
    }

    fn reduce_scatter_part(
        &mut self,
        buf: &mut [f32],
        at: usize,
        whole: usize,
    ) -> Result<(), CollectiveError> {
        let p = Part::of(buf, at, whole)?;
        self.rounds(buf, p, 0..self.world - 1, self.wire)?;
        if self.wire == GradCommDtype::Bf16 {
            // What an all-reduce would leave: the sum as it is sent on.
            let mine = self.chunk(p, self.rank + 1);
            for x in &mut buf[mine] {
                *x = bf16::from_bits(bf16_bits(*x)).to_f32();
            }
        }
        Ok(())
    }

    /// Always f32 on the wire, whatever `train.grad_comm_dtype` says: it
    /// gathers weights (and [`super::sum_by_shard`]'s bits), which must
    /// arrive as they were sent.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.rounds(
            buf,
            TcpRing::whole(buf),
            self.world - 1..2 * (self.world - 1),
            GradCommDtype::F32,
        )
    }

    fn all_reduce_part(
        &mut self,
        buf: &mut [f32],
        at: usize,
        whole: usize,
    ) -> Result<(), CollectiveError> {
        let p = Part::of(buf, at, whole)?;
        self.rounds(buf, p, 0..2 * (self.world - 1), self.wire)
    }
}

impl Part {
    /// `buf` as the values `at..` of a buffer of `whole`; refused (before
    /// anything is sent, on every rank alike) when it lies outside.
    fn of(buf: &[f32], at: usize, whole: usize) -> Result<Part, CollectiveError> {
        let n = buf.len();
        if at + n > whole {
            return Err(CollectiveError::Setup(format!(
                "a part of {n} values at {at} lies outside a buffer of {whole}"
            )));
        }
        Ok(Part { at, n, whole })
    }
}

impl TcpRing {
    /// The part that is the whole of `buf`.
    fn whole(buf: &[f32]) -> Part {
        let n = buf.len();
        Part { at: 0, n, whole: n }
    }

    /// Runs `rounds` of the ring on part `p` held in `buf`: rounds
    /// 0..w − 1 are the reduce-scatter, w − 1..2(w − 1) the all-gather
    /// (see [`TcpRing::segment`]); an all-reduce runs both. `wire`: the
    /// dtype on the wire for this call.
    fn rounds(
        &mut self,
        buf: &mut [f32],
        p: Part,
        rounds: Range<usize>,
        wire: GradCommDtype,
    ) -> Result<(), CollectiveError> {
        let w = self.world;
        // Parts per chunk: enough for the largest chunk of this call.
        let largest = (0..w).map(|i| self.chunk(p, i).len()).max().unwrap_or(0);
        let parts = largest.div_ceil(PART).max(1);
        // Segments are numbered from the first round of the whole ring.
        let (first, total) = (rounds.start * parts, rounds.end * parts);
        // Segment and byte offset reached on each side.
        let (mut sent, mut sent_bytes) = (first, 0);
        let (mut received, mut received_bytes) = (first, 0);
        // The segment `send_bits` holds (a bf16 wire).
        let mut encoded = None;
        let bf16_wire = wire == GradCommDtype::Bf16;
        let value_bytes = if bf16_wire { 2 } else { 4 };
        let mut last_progress = Instant::now();
        while sent < total || received < total {
            let mut progressed = false;
            // Send what is ready: a segment of round s+1 once the same part
            // of round s has arrived (the call's first round: at once).
            while sent < total && (sent < first + parts || sent - parts < received) {
                let range = self.segment(p, parts, sent, true);
                let bytes: &[u8] = if bf16_wire {
                    let bits = &mut self.send_bits[..range.len()];
                    if encoded != Some(sent) {
                        encoded = Some(sent);
                        for (b, x) in bits.iter_mut().zip(&buf[range.clone()]) {
                            *b = bf16_bits(*x);
                        }
                        // The first all-gather round sends the chunk this
                        // rank finished summing: it keeps what it sends.
                        if sent / parts == w - 1 {
                            for (x, b) in buf[range].iter_mut().zip(bits.iter()) {
                                *x = bf16::from_bits(*b).to_f32();
                            }
                        }
                    }
                    bytemuck::cast_slice(bits)
                } else {
                    bytemuck::cast_slice(&buf[range])
                };
                if sent_bytes == bytes.len() {
                    // Done (or empty: a chunk that misses this call's
                    // part). Progress too, or the loop would wait on the
                    // sockets for a step that needs no I/O.
                    (sent, sent_bytes, progressed) = (sent + 1, 0, true);
                    continue;
                }
                match self.next.write(&bytes[sent_bytes..]) {
                    Ok(0) => {
                        return Err(self.peer_error("send", ErrorKind::WriteZero.into()));
                    }
                    Ok(k) => (sent_bytes, progressed) = (sent_bytes + k, true),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.peer_error("send", e)),
                }
            }
            while received < total {
                let range = self.segment(p, parts, received, false);
                let reducing = received / parts < w - 1;
                if received_bytes == value_bytes * range.len() {
                    if bf16_wire {
                        let bits = &self.recv_bits[..range.len()];
                        if reducing {
                            for (x, b) in buf[range.clone()].iter_mut().zip(bits) {
                                *x += bf16::from_bits(*b).to_f32();
                            }
                        } else {
                            for (x, b) in buf[range.clone()].iter_mut().zip(bits) {
                                *x = bf16::from_bits(*b).to_f32();
                            }
                        }
                    } else if reducing {
                        for (x, y) in buf[range.clone()].iter_mut().zip(&self.scratch) {
                            *x += *y;
                        }
                    }
                    (received, received_bytes, progressed) = (received + 1, 0, true);
                    continue;
                }
                let into: &mut [u8] = if bf16_wire {
                    bytemuck::cast_slice_mut(&mut self.recv_bits[..range.len()])
                } else if reducing {
                    bytemuck::cast_slice_mut(&mut self.scratch[..range.len()])
                } else {
                    bytemuck::cast_slice_mut(&mut buf[range])
                };
                match self.prev.read(&mut into[received_bytes..]) {
                    Ok(0) => {
                        let closed = std::io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "the connection was closed",
                        );
                        return Err(self.peer_error("receive", closed));
                    }
                    Ok(k) => (received_bytes, progressed) = (received_bytes + k, true),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.peer_error("receive", e)),
                }
            }
            if progressed {
                last_progress = Instant::now();
                continue;
            }
            if sent == total && received == total {
                break;
            }
            // Both sides would block (edge-triggered: each saw WouldBlock,
            // or waits on the other): sleep until a socket is ready.
            let left = self.timeout.saturating_sub(last_progress.elapsed());
            if left.is_zero() {
                let op = if received < total { "receive" } else { "send" };
                let stalled = std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no progress for {:.1} s", self.timeout.as_secs_f64()),
                );
                return Err(self.peer_error(op, stalled));
            }
            if let Err(e) = self.poll.poll(&mut self.events, Some(left))
                && e.kind() != ErrorKind::Interrupted
            {
                return Err(CollectiveError::Setup(format!("poll: {e}")));
            }
        }
        Ok(())
    }
}

/// `x` rounded to bf16, to nearest even (a NaN stays a NaN): `half`'s
/// `bf16::from_f32`, written so that the loops over a part vectorise.
#[inline]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) as u16 | 0x0040;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Starts `world` ring members in threads of this process on 127.0.0.1 and
/// runs `f` on each (tests and benchmarks); f32 on the wire.
pub fn local_ring<T: Send>(
    world: usize,
    f: impl Fn(Box<dyn Collective>) -> T + Sync,
) -> Result<Vec<T>, CollectiveError> {
    local_ring_with(world, GradCommDtype::F32, f)
}

/// [`local_ring`] with `wire` the dtype on the wire.
pub fn local_ring_with<T: Send>(
    world: usize,
    wire: GradCommDtype,
    f: impl Fn(Box<dyn Collective>) -> T + Sync,
) -> Result<Vec<T>, CollectiveError> {
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind(IpAddr::from([127, 0, 0, 1])))
        .collect::<Result<_, _>>()
        .map_err(|e| CollectiveError::Setup(e.to_string()))?;
    let peers: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| SocketAddr::from(([127, 0, 0, 1], l.port())))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, f) = (&peers, &f);
                s.spawn(move || {
                    let c = l.connect(rank, peers, 1, b"local", Duration::from_secs(30), wire)?;
                    Ok(f(c))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CollectiveError::Setup("ring member panicked".into())))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_job::rng::{Rng, Stream};

    fn input(rank: usize, n: usize, integer: bool) -> Vec<f32> {
        let mut rng = Rng::new(rank as u64, Stream::Init);
        (0..n)
            .map(|_| {
                if integer {
                    rng.below(1000) as f32 - 500.0
                } else {
                    rng.normal() as f32
                }
            })
            .collect()
    }

    #[test]
    fn ring_sums_match_a_straightforward_sum() {
        // Lengths: empty, shorter than the world, not divisible, large.
        for world in 1..=4 {
            for n in [0, 1, 3, 7, 1000, 100_003] {
                for integer in [true, false] {
                    let results = local_ring(world, |mut c| {
                        let mut buf = input(c.rank(), n, integer);
                        c.all_reduce_sum(&mut buf).map(|_| buf)
                    })
                    .expect("ring");
                    let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, n, integer)).collect();
                    let want: Vec<f64> = (0..n)
                        .map(|i| inputs.iter().map(|x| f64::from(x[i])).sum())
                        .collect();
                    let first = results[0].as_ref().expect("rank 0");
                    for (rank, r) in results.iter().enumerate() {
                        let got = r.as_ref().expect("all-reduce");
                        // Every rank holds the same bits.
                        assert!(
                            got.iter()
                                .zip(first)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "world {world} n {n}: rank {rank} differs from rank 0"
                        );
                        for i in 0..n {
                            let tol = if integer { 0.0 } else { 1e-5 };
                            assert!(
                                (f64::from(got[i]) - want[i]).abs() <= tol,
                                "world {world} n {n} [{i}]: {} vs {}",
                                got[i],
                                want[i]
                            );
                        }
                    }
                }
            }
        }
    }

    /// The ring's rounding is `half`'s, value for value, over every sign,
    /// exponent and the mantissas that decide a rounding (ties included).
    #[test]
    fn the_wire_rounds_to_bf16_as_half_does() {
        let mut rng = Rng::new(3, Stream::Init);
        for top in 0..=0x1FFu32 {
            for low in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1_7FFF, 0x1_8000] {
                let random = rng.below(1 << 23) as u32;
                for mant in [low, random] {
                    let x = f32::from_bits((top << 23) | (mant & 0x7F_FFFF));
                    let (ours, theirs) = (bf16_bits(x), bf16::from_f32(x).to_bits());
                    if x.is_nan() {
                        assert!(bf16::from_bits(ours).is_nan(), "{x:?}");
                    } else {
                        assert_eq!(ours, theirs, "{x:e} ({:#010x})", x.to_bits());
                    }
                }
            }
        }
    }

    /// With `train.grad_comm_dtype = "bf16"`: every rank holds the same
    /// bits; small integers (exact in bf16, as are all their partial sums
    /// here) are summed exactly; any other value is the exact sum within
    /// one bf16 rounding (2^-9 relative) per hop of the partial sums it
    /// went through; bucketing changes no bit, and a reduce-scatter leaves
    /// the all-reduce's bits in its shard.
    #[test]
    fn a_bf16_wire_keeps_ranks_identical_and_sums_within_its_rounding() {
        let small = |rank: usize, n: usize| -> Vec<f32> {
            let mut rng = Rng::new(rank as u64 + 7, Stream::Init);
            (0..n).map(|_| rng.below(64) as f32 - 32.0).collect()
        };
        let cases = (2..=4)
            .flat_map(|w| [0, 1, 7, 1000].map(|n| (w, n)))
            .chain([(2, 2 * PART + 13)]);
        for (world, n) in cases {
            for integer in [true, false] {
                let make = |rank: usize| {
                    if integer {
                        small(rank, n)
                    } else {
                        input(rank, n, false)
                    }
                };
                let results = local_ring_with(world, GradCommDtype::Bf16, |mut c| {
                    let mut whole = make(c.rank());
                    c.all_reduce_sum(&mut whole)?;
                    // The same input in three buckets.
                    let mut parts = make(c.rank());
                    let cuts = [0, n / 3, n / 2, n];
                    for k in 0..3 {
                        let (a, b) = (cuts[k], cuts[k + 1]);
                        c.all_reduce_part(&mut parts[a..b], a, n)?;
                    }
                    let mut scattered = make(c.rank());
                    let mine = c.reduce_scatter_sum(&mut scattered)?;
                    Ok::<_, CollectiveError>((whole, parts, mine, scattered))
                })
                .expect("ring");
                let inputs: Vec<Vec<f32>> = (0..world).map(make).collect();
                let first = &results[0].as_ref().expect("rank 0").0;
                for (rank, r) in results.iter().enumerate() {
                    let (whole, parts, mine, scattered) = r.as_ref().expect("collectives");
                    let same = |a: &[f32], b: &[f32]| {
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                    };
                    assert!(
                        same(whole, first),
                        "world {world} n {n}: rank {rank} differs"
                    );
                    assert!(same(parts, whole), "world {world} n {n}: buckets differ");
                    assert!(
                        same(&scattered[mine.clone()], &whole[mine.clone()]),
                        "world {world} n {n}: the shard differs"
                    );
                    for i in 0..n {
                        let exact: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
                        let size: f64 = inputs.iter().map(|x| f64::from(x[i]).abs()).sum();
                        let tol = if integer {
                            0.0
                        } else {
                            world as f64 * size / 256.0
                        };
                        assert!(
                            (f64::from(whole[i]) - exact).abs() <= tol,
                            "world {world} n {n} [{i}]: {} vs {exact}",
                            whole[i]
                        );
                    }
                }
            }
        }
    }

    /// A rank's shard, its summed values, and the buffer after the gather.
    type Halves = (Range<usize>, Vec<f32>, Vec<f32>);

    /// A sharded update's collectives on rank `c`'s input of `n` values:
    /// reduce-scatter, the summed shard scaled by `scale` (the update),
    /// all-gather.
    fn halves(c: &mut dyn Collective, n: usize, scale: f32) -> Result<Halves, CollectiveError> {
        let mut buf = input(c.rank(), n, false);
        let mine = c.reduce_scatter_sum(&mut buf)?;
        let summed = buf[mine.clone()].to_vec();
        for x in &mut buf[mine.clone()] {
            *x *= scale;
        }
        c.all_gather(&mut buf)?;
        Ok((mine, summed, buf))
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_the_all_reduce_bit_for_bit() {
        // Shards partition the buffer; each rank's summed shard has the
        // all-reduce's bits; the all-gather hands every rank every owner's
        // values (here each rank changes its shard in between, as an
        // optimizer does, and the gather must carry exactly those).
        // (Chunks of several PARTs: only with 2 ranks, to keep it quick.)
        let cases = (1..=4)
            .flat_map(|w| [0, 1, 3, 7, 1000].map(|n| (w, n)))
            .chain([(2, 2 * PART + 13)]);
        for (world, n) in cases {
            {
                let reduced = local_ring(world, |mut c| {
                    let mut buf = input(c.rank(), n, false);
                    c.all_reduce_sum(&mut buf).map(|_| buf)
                })
                .expect("ring");
                let all_reduced = reduced[0].as_ref().expect("all-reduce").clone();
                let results = local_ring(world, |mut c| halves(c.as_mut(), n, 0.5)).expect("ring");
                let mut covered = vec![0u32; n];
                let mut gathered_want = vec![0f32; n];
                for r in &results {
                    let (mine, summed, _) = r.as_ref().expect("reduce-scatter");
                    for (i, x) in mine.clone().zip(summed) {
                        covered[i] += 1;
                        assert_eq!(
                            x.to_bits(),
                            all_reduced[i].to_bits(),
                            "world {world} n {n} [{i}]"
                        );
                        gathered_want[i] = x * 0.5;
                    }
                }
                assert!(
                    covered.iter().all(|&k| k == 1),
                    "world {world} n {n}: shards {covered:?}"
                );
                for (rank, r) in results.iter().enumerate() {
                    let (_, _, got) = r.as_ref().expect("all-gather");
                    assert!(
                        got.iter()
                            .zip(&gathered_want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "world {world} n {n}: rank {rank}'s gather"
                    );
                }
            }
        }
    }

    #[test]
    fn the_default_halves_agree_with_the_ring() {
        // A backend with only all_reduce_sum (the trait's defaults) gives
        // the same shards and gathered values as the ring's own halves.
        #[derive(Debug)]
        struct OnlySum(Box<dyn Collective>);
        impl Collective for OnlySum {
            fn rank(&self) -> usize {
                self.0.rank()
            }
            fn world_size(&self) -> usize {
                self.0.world_size()
            }
            fn shard(&self, n: usize) -> Range<usize> {
                self.0.shard(n)
            }
            fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
                self.0.all_reduce_sum(buf)
            }
        }
        let run = |default: bool| {
            local_ring(3, move |c| {
                let mut c: Box<dyn Collective> = if default { Box::new(OnlySum(c)) } else { c };
                halves(c.as_mut(), 1001, 1.0)
            })
            .expect("ring")
            .into_iter()
            .map(|r| r.expect("collective"))
            .collect::<Vec<_>>()
        };
        assert_eq!(run(true), run(false));
    }

    #[test]
    fn the_sum_is_the_same_bits_every_time() {
        let run = || {
            local_ring(3, |mut c| {
                let mut buf = input(c.rank(), 10_001, false);
                c.all_reduce_sum(&mut buf).map(|_| buf)
            })
            .expect("ring")
            .into_iter()
            .map(|r| r.expect("all-reduce"))
            .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn an_abort_unblocks_a_rank_waiting_on_a_frozen_peer() {
        // Rank 1 never calls the all-reduce (as if frozen) and keeps its
        // sockets open until rank 0 has returned — or 20 s, well before the
        // ring's own 30 s stall timeout would release rank 0. Only the abort
        // handle can release rank 0 in time.
        let (returned, released) = std::sync::mpsc::channel::<()>();
        let (returned, released) = (
            std::sync::Mutex::new(returned),
            std::sync::Mutex::new(released),
        );
        let results = local_ring(2, |mut c| {
            if c.rank() == 1 {
                let in_time = released
                    .lock()
                    .map(|r| r.recv_timeout(Duration::from_secs(20)).is_ok())
                    .unwrap_or(false);
                drop(c);
                return Ok(in_time);
            }
            let handle = c.abort_handle().expect("a ring has an abort handle");
            let aborter = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                handle.abort();
            });
            let mut buf = vec![1.0f32; 1 << 20];
            let r = c.all_reduce_sum(&mut buf);
            if let Ok(tx) = returned.lock() {
                let _ = tx.send(());
            }
            let _ = aborter.join();
            r.map(|_| false)
        })
        .expect("ring");
        assert!(results[0].is_err(), "the aborted all-reduce must fail");
        assert!(
            matches!(results[1], Ok(true)),
            "rank 0 must return while its peer still holds the ring open"
        );
    }

    #[test]
    fn barrier_and_a_dead_peer() {
        let ok = local_ring(3, |mut c| c.barrier().is_ok()).expect("ring");
        assert!(ok.iter().all(|b| *b));
        // A peer that never joins: connect fails with a named rank, no hang.
        let l = RingListener::bind(IpAddr::from([127, 0, 0, 1])).expect("bind");
        let ghost = RingListener::bind(IpAddr::from([127, 0, 0, 1])).expect("bind");
        let peers = [
            SocketAddr::from(([127, 0, 0, 1], l.port())),
            SocketAddr::from(([127, 0, 0, 1], ghost.port())),
        ];
        let e = l
            .connect(
                0,
                &peers,
                1,
                b"id",
                Duration::from_millis(300),
                GradCommDtype::F32,
            )
            .expect_err("must time out")
            .to_string();
        assert!(e.contains("rank 1"), "{e}");
    }

    /// Ranks handed different ids (another formation or job) never form a
    /// ring: each refuses the other's connection and times out naming it.
    #[test]
    fn ranks_with_different_shared_ids_do_not_connect() {
        let a = RingListener::bind(IpAddr::from([127, 0, 0, 1])).expect("bind");
        let b = RingListener::bind(IpAddr::from([127, 0, 0, 1])).expect("bind");
        let peers = [
            SocketAddr::from(([127, 0, 0, 1], a.port())),
            SocketAddr::from(([127, 0, 0, 1], b.port())),
        ];
        let results = std::thread::scope(|s| {
            let ha = s.spawn(|| {
                a.connect(
                    0,
                    &peers,
                    1,
                    b"id-one",
                    Duration::from_millis(500),
                    GradCommDtype::F32,
                )
                .map(|_| ())
            });
            let hb = s.spawn(|| {
                b.connect(
                    1,
                    &peers,
                    1,
                    b"id-two",
                    Duration::from_millis(500),
                    GradCommDtype::F32,
                )
                .map(|_| ())
            });
            [ha.join().expect("join"), hb.join().expect("join")]
        });
        for r in results {
            let e = r.expect_err("mismatched ids must not connect").to_string();
            assert!(e.contains("never connected"), "{e}");
        }
    }
}
