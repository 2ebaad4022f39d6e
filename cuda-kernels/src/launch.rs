//! Launch configurations, one function per kernel: grid, block and dynamic
//! shared memory as functions of the shape alone. The emulator runs these
//! configurations now and the GPU path will launch the same ones, so both
//! execute the same blocks and the same reduction orders (a kernel's bits
//! may depend on its configuration, never on scheduling).
//!
//! Every configuration is valid on an H100 for the shapes the kernels
//! accept: at most 1,024 threads per block, grid.y and grid.z at most
//! 65,535, dynamic shared memory at most 227 KiB. Above 48 KiB a kernel
//! must be allowed the extra shared memory before it is launched on a GPU
//! (`cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)`):
//! see [`Launch::needs_shared_opt_in`].

/// Grid and block sizes (x, y, z) and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Launch {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

/// Threads per block of an H100.
pub const MAX_THREADS: u32 = 1024;
/// Shared memory one block may have on an H100 (227 KiB, with the opt-in).
pub const MAX_SHARED_BYTES: u32 = 227 * 1024;
/// Dynamic shared memory a kernel gets without the opt-in.
pub const DEFAULT_SHARED_BYTES: u32 = 48 * 1024;

/// Rows per block of the two-pass column sums (LayerNorm's dw and db, the
/// bias gradients): the CPU kernels' `BLOCK_ROWS`.
pub const BLOCK_ROWS: usize = 32;

/// Attention tiles: query rows and keys per tile, threads per block (as
/// ATT_BQ, ATT_BK and ATT_THREADS in attention.cu).
pub const ATTENTION_BQ: usize = 32;
/// Keys per attention tile.
pub const ATTENTION_BK: usize = 32;
const ATTENTION_THREADS: u32 = 128;

/// Threads per block of the elementwise kernels.
const ELEMENTWISE_THREADS: u32 = 256;
/// Warps (rows) per block of the warp-per-row kernels.
const ROW_WARPS: u32 = 8;
/// Blocks of the first pass of the sum of squares, at most.
const SUMSQ_MAX_BLOCKS: usize = 512;
const SUMSQ_THREADS: u32 = 256;

impl Launch {
    fn new(grid: [usize; 3], block: [u32; 3], shared_bytes: usize) -> Launch {
        // An impossible size becomes u32::MAX, which `check` rejects.
        let fit = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        Launch {
            grid: [fit(grid[0]), fit(grid[1]), fit(grid[2])],
            block,
            shared_bytes: fit(shared_bytes),
        }
    }

    /// Threads per block.
    pub fn threads(&self) -> u64 {
        self.block.iter().map(|&b| u64::from(b)).product()
    }

    /// Whether the kernel must be granted more than the default 48 KiB of
    /// dynamic shared memory before a GPU launch.
    pub fn needs_shared_opt_in(&self) -> bool {
        self.shared_bytes > DEFAULT_SHARED_BYTES
    }

    /// Checks the H100's limits (the emulator checks them again).
    pub fn check(&self) -> Result<(), String> {
        if self.grid.contains(&0) || self.block.contains(&0) {
            return Err(format!("{self:?}: every size must be at least 1"));
        }
        if self.grid[0] > i32::MAX as u32 || self.grid[1] > 65_535 || self.grid[2] > 65_535 {
            return Err(format!("{self:?}: grid beyond (2³¹ − 1, 65535, 65535)"));
        }
        if self.block[0] > 1024 || self.block[1] > 1024 || self.block[2] > 64 {
            return Err(format!("{self:?}: block beyond (1024, 1024, 64)"));
        }
        if self.threads() > u64::from(MAX_THREADS) {
            return Err(format!(
                "{self:?}: more than {MAX_THREADS} threads per block"
            ));
        }
        if self.shared_bytes > MAX_SHARED_BYTES {
            return Err(format!(
                "{self:?}: more than {MAX_SHARED_BYTES} bytes of shared memory"
            ));
        }
        Ok(())
    }
}

fn one_d(blocks: usize, threads: u32) -> Launch {
    Launch::new([blocks, 1, 1], [threads, 1, 1], 0)
}

/// One thread per element of `n`.
pub fn elementwise_launch(n: usize) -> Launch {
    one_d(
        n.div_ceil(ELEMENTWISE_THREADS as usize),
        ELEMENTWISE_THREADS,
    )
}

/// One warp per row of `rows`.
fn warp_per_row(rows: usize) -> Launch {
    one_d(rows.div_ceil(ROW_WARPS as usize), ROW_WARPS * 32)
}

/// Threads over `width` columns: up to 256, whole warps.
fn column_threads(width: usize) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// Blocks of [`BLOCK_ROWS`] rows in `n` rows: the rows of a partial-sum
/// buffer.
pub fn partial_blocks(n: usize) -> usize {
    n.div_ceil(BLOCK_ROWS)
}

/// `stride_embedding_forward_*`: out (N, C).
pub fn embedding_forward_launch(n: usize, c: usize) -> Launch {
    elementwise_launch(n * c)
}

/// `stride_token_embedding_backward_*`: a block per segment (token) and
/// column tile.
pub fn token_embedding_backward_launch(segments: usize, c: usize) -> Launch {
    let threads = column_threads(c);
    Launch::new(
        [segments, c.div_ceil(threads as usize), 1],
        [threads, 1, 1],
        0,
    )
}

/// `stride_position_embedding_backward_*`: a thread per element of dwpe (T, C).
pub fn position_embedding_backward_launch(t: usize, c: usize) -> Launch {
    elementwise_launch(t * c)
}

/// `stride_layernorm_forward_*`: a warp per row.
pub fn layernorm_forward_launch(n: usize, _c: usize) -> Launch {
    warp_per_row(n)
}

/// `stride_layernorm_backward_*`: a block of 8 warps per [`BLOCK_ROWS`] rows.
pub fn layernorm_backward_launch(n: usize, _c: usize) -> Launch {
    one_d(partial_blocks(n), ROW_WARPS * 32)
}

/// `stride_reduce_partials_f32`: a thread per column of `w`.
pub fn reduce_partials_launch(w: usize) -> Launch {
    elementwise_launch(w)
}

/// `stride_column_sums_*` over (N, W): block (k, y) takes rows
/// [`BLOCK_ROWS`]·k.. of column tile y.
pub fn column_sums_launch(n: usize, w: usize) -> Launch {
    let threads = column_threads(w);
    Launch::new(
        [partial_blocks(n), w.div_ceil(threads as usize), 1],
        [threads, 1, 1],
        0,
    )
}

/// `stride_gelu_forward_*`, `stride_gelu_backward_*`, `stride_add_*`.
pub fn gelu_launch(n: usize) -> Launch {
    elementwise_launch(n)
}

/// Dynamic shared memory of the attention kernels for head size `hs`, in
/// f32s, as laid out in attention.cu.
fn attention_floats(kernel: AttentionKernel, hs: usize) -> usize {
    let (bq, bk) = (ATTENTION_BQ, ATTENTION_BK);
    match kernel {
        // q, k (padded), v, o, scores, m, l, correction
        AttentionKernel::Forward => bq * hs + bk * (hs + 1) + bk * hs + bq * hs + bq * bk + 3 * bq,
        // k, v (padded), dk, dv, q, do, p, ds, lse, dots
        AttentionKernel::Dkv => {
            2 * bk * (hs + 1) + 2 * bk * hs + 2 * bq * hs + 2 * bq * bk + 2 * bq
        }
        // q, do, dq, k, v (padded), p, ds, lse, dots
        AttentionKernel::Dq => 3 * bq * hs + 2 * bk * (hs + 1) + 2 * bq * bk + 2 * bq,
    }
}

#[derive(Clone, Copy)]
enum AttentionKernel {
    Forward,
    Dkv,
    Dq,
}

fn attention_tiles(kernel: AttentionKernel, b: usize, t: usize, c: usize, nh: usize) -> Launch {
    let hs = c / nh.max(1);
    let tile = match kernel {
        AttentionKernel::Dkv => ATTENTION_BK,
        _ => ATTENTION_BQ,
    };
    Launch::new(
        [t.div_ceil(tile), b * nh, 1],
        [ATTENTION_THREADS, 1, 1],
        attention_floats(kernel, hs) * 4,
    )
}

/// `stride_attention_forward_*`: a block per query tile and (sequence, head).
pub fn attention_forward_launch(b: usize, t: usize, c: usize, nh: usize) -> Launch {
    attention_tiles(AttentionKernel::Forward, b, t, c, nh)
}

/// `stride_attention_row_dots_*`: a warp per (sequence, head, position).
pub fn attention_row_dots_launch(b: usize, t: usize, nh: usize) -> Launch {
    warp_per_row(b * nh * t)
}

/// `stride_attention_backward_dkv_*`: a block per key tile and (sequence, head).
pub fn attention_backward_dkv_launch(b: usize, t: usize, c: usize, nh: usize) -> Launch {
    attention_tiles(AttentionKernel::Dkv, b, t, c, nh)
}

/// `stride_attention_backward_dq_*`: a block per query tile and (sequence, head).
pub fn attention_backward_dq_launch(b: usize, t: usize, c: usize, nh: usize) -> Launch {
    attention_tiles(AttentionKernel::Dq, b, t, c, nh)
}

/// `stride_cross_entropy_f32`: a block per row of (R, V); 1,024 threads for
/// a GPT-2 vocabulary, fewer for small ones.
pub fn cross_entropy_launch(rows: usize, v: usize) -> Launch {
    let threads = if v >= 8 * 1024 { 1024 } else { 256 };
    one_d(rows, threads)
}

/// Blocks of the sum of squares' first pass over `n` values (a function
/// of n alone, so the result is too): the length of its partials.
pub fn sumsq_blocks(n: usize) -> usize {
    n.div_ceil(SUMSQ_THREADS as usize)
        .clamp(1, SUMSQ_MAX_BLOCKS)
}

/// `stride_sumsq_partials_f32`.
pub fn sumsq_partials_launch(n: usize) -> Launch {
    one_d(sumsq_blocks(n), SUMSQ_THREADS)
}

/// `stride_sumsq_final_f32`: one block.
pub fn sumsq_final_launch(_blocks: usize) -> Launch {
    one_d(1, SUMSQ_THREADS)
}

/// `stride_cast_f32_to_bf16`, `stride_cast_bf16_to_f32`.
pub fn cast_launch(n: usize) -> Launch {
    elementwise_launch(n)
}

/// `stride_adamw_f32`: a thread per element of the `n` parameters.
pub fn adamw_launch(n: usize) -> Launch {
    elementwise_launch(n)
}

/// `stride_grad_factor_f32`: one thread (a few scalar operations).
pub fn grad_factor_launch() -> Launch {
    one_d(1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_shapes_are_valid_on_an_h100() {
        // GPT-2 small at context 1,024, micro-batch 8; XL's width; hs 128.
        let (b, t, c, nh, v) = (8, 1024, 768, 12, 50_304);
        let n = b * t;
        let launches = [
            embedding_forward_launch(n, c),
            token_embedding_backward_launch(n, c),
            position_embedding_backward_launch(t, c),
            layernorm_forward_launch(n, c),
            layernorm_backward_launch(n, 1600),
            reduce_partials_launch(4 * c),
            column_sums_launch(n, 4 * c),
            gelu_launch(n * 4 * c),
            attention_forward_launch(b, t, c, nh),
            attention_row_dots_launch(b, t, nh),
            attention_backward_dkv_launch(b, t, c, nh),
            attention_backward_dq_launch(b, t, c, nh),
            attention_forward_launch(b, t, 1536, 12),
            attention_backward_dkv_launch(b, t, 1536, 12),
            attention_backward_dq_launch(b, t, 1536, 12),
            cross_entropy_launch(256, v),
            sumsq_partials_launch(124_475_904),
            sumsq_final_launch(sumsq_blocks(124_475_904)),
            cast_launch(124_475_904),
            // GPT-2 XL's 1.56 billion parameters.
            adamw_launch(1_557_611_200),
        ];
        for l in launches {
            assert!(l.check().is_ok(), "{l:?}");
            assert_eq!(l.threads() % 32, 0, "{l:?}: whole warps");
        }
        // hs 64: 37,376 bytes forward, 57,856 (dK dV) and 49,664 (dQ)
        // backward: the backward kernels need the shared-memory opt-in.
        assert_eq!(attention_forward_launch(b, t, c, nh).shared_bytes, 37_376);
        assert_eq!(
            attention_backward_dkv_launch(b, t, c, nh).shared_bytes,
            57_856
        );
        assert_eq!(
            attention_backward_dq_launch(b, t, c, nh).shared_bytes,
            49_664
        );
        assert!(!attention_forward_launch(b, t, c, nh).needs_shared_opt_in());
        assert!(attention_backward_dkv_launch(b, t, c, nh).needs_shared_opt_in());
        assert!(attention_backward_dq_launch(b, t, c, nh).needs_shared_opt_in());
        // One thread, not a warp: it computes two scalars.
        assert!(grad_factor_launch().check().is_ok());
        assert_eq!(grad_factor_launch().threads(), 1);
    }

    #[test]
    fn invalid_configurations_are_rejected() {
        let mut l = elementwise_launch(10);
        l.block = [2048, 1, 1];
        assert!(l.check().is_err());
        let mut l = elementwise_launch(10);
        l.shared_bytes = MAX_SHARED_BYTES + 1;
        assert!(l.check().is_err());
        assert!(
            Launch::new([usize::MAX, 1, 1], [32, 1, 1], 0)
                .check()
                .is_err()
        );
    }
}
