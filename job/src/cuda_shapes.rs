//! What the fused engine's CUDA kernels (the `stride-cuda-kernels` crate)
//! can take, as pure arithmetic on a model's shape: the limits their plans
//! check at every launch, here so that a config is refused for them when
//! it is read ([`supports`], called by `Config::validate` for
//! `worker.engine = fused` on CUDA, and by the worker's engine choice for
//! `auto`), never inside a kernel. The kernels' crate uses these same
//! constants, and its tests hold [`supports`] to its launch plans.

/// The attention kernels' head sizes: multiples of this (their tiles read
/// rows of 8 elements)...
pub const HEAD_SIZE_STEP: usize = 8;
/// ... up to this (their shared-memory tiles hold whole rows: 107 KiB for
/// the backward's dK dV at 128).
pub const MAX_HEAD_SIZE: usize = 128;

/// Whether the attention kernels take heads of `hs` elements.
pub fn head_size_ok(hs: usize) -> bool {
    hs.is_multiple_of(HEAD_SIZE_STEP) && (HEAD_SIZE_STEP..=MAX_HEAD_SIZE).contains(&hs)
}

/// The most rows of logits a caller computes at once (the worker's LM head
/// works in chunks of at most this many rows; `cross_entropy` takes rows × V
/// logits as an `int`).
pub const MAX_HEAD_ROWS: usize = 256;

/// The most blocks in a grid's y dimension: attention launches a block row
/// per (sequence, head).
pub const MAX_GRID_Y: usize = 65_535;

/// A GPT's shape and its micro-batch, as the fused engine hands them to the
/// kernels: what [`supports`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// `model.n_head`.
    pub n_head: usize,
    /// `model.n_embd` (C).
    pub n_embd: usize,
    /// `model.vocab_size` (V).
    pub vocab_size: usize,
    /// `model.context` (T).
    pub context: usize,
    /// `train.micro_batch` (B): sequences per forward and backward.
    pub micro_batch: usize,
}

/// A shape the CUDA kernels refuse: the config key to change, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The key, as a config names it (`model.n_head`, `train.micro_batch`, ...).
    pub key: &'static str,
    /// What the kernels need, with the values that break it.
    pub reason: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.key, self.reason)
    }
}

impl std::error::Error for Unsupported {}

/// Whether the fused engine's CUDA kernels take every call a step of this
/// shape makes — checked once, where a config is read, so that no kernel
/// ever refuses one in the middle of a job. Pure: no GPU, no CUDA. The
/// limits are the plans' own (`Heads::check`, `cross_entropy`'s sizes,
/// the launch grid's): the head size is a multiple of 8 up to 128, B·NH
/// blocks fit a grid's y dimension (65,535), B·T·3C and
/// min(B·T, [`MAX_HEAD_ROWS`])·V fit the kernels' 32-bit `int`s. Anything
/// the CPU kernels take and these refuse runs on the composed engine.
pub fn supports(s: &ModelShape) -> Result<(), Unsupported> {
    let refuse = |key, reason: String| Err(Unsupported { key, reason });
    for (key, value) in [
        ("model.n_head", s.n_head),
        ("model.n_embd", s.n_embd),
        ("model.vocab_size", s.vocab_size),
        ("model.context", s.context),
        ("train.micro_batch", s.micro_batch),
    ] {
        if value == 0 {
            return refuse(key, "must be at least 1".into());
        }
    }
    let (b, t, c, nh, v) = (s.micro_batch, s.context, s.n_embd, s.n_head, s.vocab_size);
    if !c.is_multiple_of(nh) {
        return refuse(
            "model.n_head",
            format!("{nh} heads do not divide model.n_embd = {c}"),
        );
    }
    let hs = c / nh;
    if !head_size_ok(hs) {
        let fits: Vec<String> = (1..=c)
            .filter(|&h| c.is_multiple_of(h) && head_size_ok(c / h))
            .take(4)
            .map(|h| h.to_string())
            .collect();
        let hint = if fits.is_empty() {
            format!(
                "no head count does for model.n_embd = {c} (it must be a multiple of \
                 {HEAD_SIZE_STEP})"
            )
        } else {
            format!("n_head = {} would", fits.join(", "))
        };
        return refuse(
            "model.n_head",
            format!(
                "head size n_embd / n_head = {c} / {nh} = {hs}: the CUDA attention kernels \
                 take multiples of {HEAD_SIZE_STEP} up to {MAX_HEAD_SIZE} ({hint})"
            ),
        );
    }
    let as_int = |x: Option<usize>| x.filter(|&x| x <= i32::MAX as usize);
    if b.checked_mul(nh).is_none_or(|blocks| blocks > MAX_GRID_Y) {
        return refuse(
            "train.micro_batch",
            format!(
                "{b} sequences × {nh} heads = {} attention block rows, above a grid's \
                 {MAX_GRID_Y}",
                b.saturating_mul(nh)
            ),
        );
    }
    let n = b.checked_mul(t);
    if as_int(n.and_then(|n| n.checked_mul(3 * c))).is_none() {
        return refuse(
            "train.micro_batch",
            format!(
                "B·T·3C = {b} × {t} × 3 × {c} values of qkv do not fit the kernels' 32-bit \
                 sizes (at most {})",
                i32::MAX
            ),
        );
    }
    let rows = n.map_or(MAX_HEAD_ROWS, |n| n.min(MAX_HEAD_ROWS));
    if as_int(rows.checked_mul(v)).is_none() {
        return refuse(
            "model.vocab_size",
            format!(
                "{rows} rows of {v} logits do not fit the cross-entropy's 32-bit size (at most \
                 {})",
                i32::MAX
            ),
        );
    }
    Ok(())
}
