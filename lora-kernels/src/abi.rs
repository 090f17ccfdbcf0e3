//! Plain-data types and constants shared by the kernels (device) and the host code that fills and reads
//! the buffers they work on. Every struct is `#[repr(C)]` with explicit padding so the host can `bytemuck`
//! it into device memory byte for byte.

/// `tok_slot` value of a token without an adapter (and of padding rows).
pub const NO_SLOT: u32 = u32::MAX;

/// Rows of one M tile: the `m16` of `mma.m16n8k16`. Every grouped-GEMM work item covers at most this many
/// tokens of one slot.
pub const TILE_M: u32 = 16;
/// Threads per block of the shrink and expand kernels (4 warps).
pub const GEMM_THREADS: u32 = 128;
/// Warps per block of the shrink and expand kernels.
pub const GEMM_WARPS: u32 = GEMM_THREADS / 32;
/// The `k` one warp of the shrink consumes per iteration (two `m16n8k16` steps from one 16-byte load).
pub const SHRINK_K_STEP: u32 = 32;
/// Output columns one expand block writes (32 per warp: four `n8` tiles).
pub const EXPAND_BN: u32 = 128;
/// Largest rank the kernels support (the shrink keeps `MAX_RANK / 8` accumulator tiles in registers).
pub const MAX_RANK: u32 = 128;
/// Most modules one module group may hold (q, k, v is the largest group of a Llama layer).
pub const MAX_GROUP_MODULES: u32 = 4;
/// Threads of the single block of the prep kernel.
pub const PREP_THREADS: u32 = 1024;

/// Host-written, per (layer, module, slot): where the adapter in that slot keeps this module's weights.
/// `a` points at `lora_A` as `[rank, k]` row-major bf16, `b` at `lora_B` as `[n, rank]` row-major bf16.
/// A null pointer or rank 0 means the adapter does not adapt this module.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(not(target_arch = "nvptx64"), derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SlotWeights {
    /// Device address of `lora_A` (`[rank, k]`, row stride `k`).
    pub a: u64,
    /// Device address of `lora_B` (`[n, rank]`, row stride `rank`).
    pub b: u64,
    /// The adapter's rank for this module (0 = not adapted).
    pub rank: u32,
    /// `alpha / rank` (or `alpha / sqrt(rank)` for rsLoRA).
    pub scale: f32,
}

/// Static shape of one adapted module: `y[:, y_col .. y_col + n] += scale * B (A x)` with `x` of width `k`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "nvptx64"), derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ModuleShape {
    /// Output width (`out_features`).
    pub n: u32,
    /// Input width (`in_features`).
    pub k: u32,
    /// First column of this module's output inside its group's fused output `y`.
    pub y_col: u32,
    /// Padding, always 0.
    pub _pad: u32,
}

/// One grouped-GEMM problem, per (layer, module, slot), written by the prep kernel every step.
/// `m == 0` marks a zero-sized problem (empty slot, rank 0 or a null weight pointer): kernels skip it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(not(target_arch = "nvptx64"), derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GemmDesc {
    /// `lora_A` address (`[rank, k]`).
    pub a: u64,
    /// `lora_B` address (`[n, rank]`).
    pub b: u64,
    /// Tokens of this slot in this step (rows of the shrink / expand problem).
    pub m: u32,
    /// First row of this slot inside the slot-sorted order (index into `perm`).
    pub row_off: u32,
    /// Output width.
    pub n: u32,
    /// Input width.
    pub k: u32,
    /// Rank: the shrink's `n` and the expand's `k`.
    pub rank: u32,
    /// Row stride of `lora_A` in elements (= `k`).
    pub lda: u32,
    /// Row stride of `lora_B` in elements (= `rank`).
    pub ldb: u32,
    /// Column of this module's output in its group's fused `y`.
    pub y_col: u32,
    /// `scale_s`.
    pub scale: f32,
    /// Padding, always 0.
    pub _pad: u32,
}

/// One unit of grouped-GEMM work: up to [`TILE_M`] consecutive slot-sorted rows of one slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "nvptx64"), derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Tile {
    /// The slot whose adapter these rows use.
    pub slot: u32,
    /// First slot-sorted row (index into `perm`).
    pub row_start: u32,
    /// Rows in this tile, 1..=16.
    pub rows: u32,
    /// Padding, always 0.
    pub _pad: u32,
}

/// Layout of the packed per-step input the host uploads in one copy (all `u32` words):
///
/// ```text
/// [num_reqs, num_tokens, req_slot[max_reqs], req_tok_off[max_reqs + 1],
///  num_changed, changed_slot[num_slots], (pad to even), entries[num_changed][entries_per_slot]]
/// ```
///
/// `req_slot[i] >= num_slots` means request `i` uses no adapter; request `i` owns tokens
/// `req_tok_off[i] .. req_tok_off[i + 1]` (non-decreasing, `req_tok_off[0] == 0`). The second line is the
/// pointer-table update: for each of the `num_changed` slots whose occupant changed, its new
/// [`SlotWeights`] for every (layer, module), which the prep kernel scatters into the persistent table
/// before building descriptors. Only the used prefix (up to `entries_at() + num_changed × entries`) needs
/// copying. A layout with `entries_per_slot == 0` can only carry steps without table updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLayout {
    /// Capacity in requests.
    pub max_reqs: u32,
    /// Slots (capacity of the update section).
    pub num_slots: u32,
    /// Table entries per slot: layers × modules.
    pub entries_per_slot: u32,
}

/// Words of one [`SlotWeights`].
pub const SLOT_WEIGHTS_WORDS: usize = core::mem::size_of::<SlotWeights>() / 4;

impl StepLayout {
    /// Index of `num_reqs`.
    pub const NUM_REQS: usize = 0;
    /// Index of `num_tokens`.
    pub const NUM_TOKENS: usize = 1;
    /// A layout for `max_reqs` requests and table updates of `num_slots` × `entries_per_slot` entries.
    pub const fn new(max_reqs: u32, num_slots: u32, entries_per_slot: u32) -> Self {
        StepLayout { max_reqs, num_slots, entries_per_slot }
    }
    /// Index of `req_slot[0]`.
    pub const fn slot_at(&self) -> usize {
        2
    }
    /// Index of `req_tok_off[0]`.
    pub const fn off_at(&self) -> usize {
        2 + self.max_reqs as usize
    }
    /// Index of `num_changed`.
    pub const fn num_changed_at(&self) -> usize {
        3 + 2 * self.max_reqs as usize
    }
    /// Index of `changed_slot[0]`.
    pub const fn changed_slot_at(&self) -> usize {
        self.num_changed_at() + 1
    }
    /// Index of the first entry (even, so entries are 8-byte aligned).
    pub const fn entries_at(&self) -> usize {
        (self.changed_slot_at() + self.num_slots as usize).div_ceil(2) * 2
    }
    /// Total words (every slot changed).
    pub const fn words(&self) -> usize {
        self.entries_at() + self.num_slots as usize * self.entries_per_slot as usize * SLOT_WEIGHTS_WORDS
    }
}

/// Upper bound on the number of tiles of a step with at most `max_tokens` tokens over `num_slots` slots:
/// each non-empty slot wastes at most one partial tile.
pub const fn max_tiles(max_tokens: u32, num_slots: u32) -> u32 {
    let full = max_tokens.div_ceil(TILE_M);
    let partial = if num_slots < max_tokens { num_slots } else { max_tokens };
    full + partial
}

/// Shared memory the prep kernel needs, in bytes, for `max_reqs` requests and `num_slots` slots.
pub const fn prep_shared_bytes(max_reqs: u32, num_slots: u32) -> u32 {
    // slot[max_reqs], off[max_reqs + 1], dst[max_reqs], count[slots], base[slots + 1], tile_base[slots + 1]
    4 * (3 * max_reqs + 1 + 3 * num_slots + 2)
}

/// Shared memory the shrink kernel needs, in bytes, for ranks up to `max_rank`: one 16 × rank f32 tile per
/// warp (rank rounded up by [`rank_pad`]) for the cross-warp reduction, plus 16 bytes the kernel no longer
/// reads (they held a flag of an older split reduction; kept so the measured launch shape is unchanged).
pub const fn shrink_shared_bytes(max_rank: u32) -> u32 {
    GEMM_WARPS * TILE_M * rank_pad(max_rank) * 4 + 16
}

/// Shared memory of the fused LoRA kernel (`kernels::fused`), in bytes, for partial rows of `r_pad`: the
/// shrink's cross-warp reduction tile of each warp (16 × `r_pad` f32) and one 16-byte cell after it for the
/// block's work ticket.
pub const fn fused_shared_bytes(r_pad: u32) -> u32 {
    GEMM_WARPS * TILE_M * r_pad * 4 + 16
}

/// Word of the fused kernel's sync area that hands out work tickets.
pub const FUSED_TICKET: usize = 0;
/// Word of the fused kernel's sync area that counts the blocks that have left.
pub const FUSED_EXITS: usize = 1;
/// First of the fused kernel's readiness counters, one per (tile, module): `sync[FUSED_READY + tile ·
/// n_mod + module]` counts the shrink splits of that pair whose partials are published.
pub const FUSED_READY: usize = 2;

/// Words of the fused kernel's sync area for `max_tiles` tiles of `n_mod` modules. It must be zero before
/// the first launch; every launch leaves it zero again (the last block to leave resets it).
pub const fn fused_sync_words(max_tiles: u32, n_mod: u32) -> usize {
    FUSED_READY + max_tiles as usize * n_mod as usize
}

/// Word of the LoRA projection's sync area (`kernels::projection`) that hands out block tickets.
pub const PROJ_TICKET: usize = 0;
/// Word of the LoRA projection's sync area that counts the A blocks whose shrink result is published.
pub const PROJ_A_DONE: usize = 1;
/// Word of the LoRA projection's sync area that counts the blocks that have left.
pub const PROJ_EXITS: usize = 2;
/// Words of the LoRA projection's sync area (one 16-byte cell). Zero before the first launch; every launch
/// leaves it zero again (the last block to leave resets it).
pub const PROJ_SYNC_WORDS: usize = 4;

/// Coordinates `(module, tile, inner)` of work item `w` of a grouped GEMM's item list, numbered module
/// slowest and `inner` (the shrink's split, the expand's column block) fastest over `inner` values and
/// `tiles` tiles. The shrink, the expand and the fused kernel all number their items this way.
pub const fn work_item(w: u32, inner: u32, tiles: u32) -> (u32, u32, u32) {
    (w / inner / tiles, (w / inner) % tiles, w % inner)
}

/// The split-K factor and chunk of the shrink for a step: `blocks` is the shrink's grid, `items` the step's
/// `tiles × n_mod`. About one work item per block, at most `max_splits`, every chunk a multiple of
/// [`SHRINK_K_STEP`] and no empty split. The expand recomputes it to know how many partials to sum.
pub const fn shrink_splits(blocks: u32, items: u32, max_splits: u32, k: u32) -> (u32, u32) {
    let items = if items == 0 { 1 } else { items };
    let max = if max_splits == 0 { 1 } else { max_splits };
    let want = blocks.div_ceil(items);
    let splits = if want < 1 {
        1
    } else if want > max {
        max
    } else {
        want
    };
    let k_chunk = k.div_ceil(splits).div_ceil(SHRINK_K_STEP) * SHRINK_K_STEP;
    if k_chunk == 0 {
        return (1, SHRINK_K_STEP);
    }
    (k.div_ceil(k_chunk), k_chunk)
}

/// Round `r` up to the rank padding of the partial rows (a multiple of 16: one expand `k` step).
pub const fn rank_pad(r: u32) -> u32 {
    r.div_ceil(16) * 16
}

// ---------------------------------------------------------------------------------------------------
// Model kernels (`kernels::model`): layouts and launch constants shared with the host.
// ---------------------------------------------------------------------------------------------------

/// Threads per block of `rmsnorm_residual` (one block per row).
pub const NORM_THREADS: u32 = 256;
/// Threads per block of `rope_kv_write` (one block per token).
pub const ROPE_THREADS: u32 = 128;
/// Threads per block of `decode_attention` (4 warps).
pub const DECODE_THREADS: u32 = 128;
/// Warps per block of `decode_attention`.
pub const DECODE_WARPS: u32 = DECODE_THREADS / 32;
/// Most query heads per KV head (GQA group) `decode_attention` supports (its per-lane registers).
pub const DECODE_MAX_GROUP: u32 = 8;
/// Tokens each lane group of `decode_attention` computes per iteration (one pipeline stage).
pub const DECODE_UNROLL: u32 = 4;
/// Stages of `decode_attention`'s shared-memory K/V ring (`DECODE_STAGES − 1` stages in flight while one is
/// computed).
pub const DECODE_STAGES: u32 = 3;
/// Bytes of one stage of the ring: [`DECODE_UNROLL`] tokens × (K, V) × 16 bytes for each of the
/// [`DECODE_THREADS`] threads (16 KiB, whatever the head dimension).
pub const DECODE_STAGE_BYTES: u32 = DECODE_UNROLL * 2 * 16 * DECODE_THREADS;
/// Most context splits of one `decode_attention` launch (the merge reads all of them per output).
pub const DECODE_MAX_SPLITS: u32 = 64;
/// Threads per block of `attention_merge`, `silu_mul` and `embedding_gather`.
pub const SMALL_THREADS: u32 = 128;
/// Threads per block of `argmax_f32` / `argmax_bf16` (one block per row).
pub const ARGMAX_THREADS: u32 = 512;
/// `slot` value of a token whose K/V is not written to the cache (padding rows).
pub const NO_KV_SLOT: u32 = u32::MAX;

/// Layout of one layer's paged KV cache (K and V are two separate arrays of this layout), bf16:
///
/// ```text
/// cache[page][kv_head][page_slot][head_dim]      (row-major, head_dim fastest)
/// ```
///
/// A sequence's token at position `pos` lives in page `page_table[pos / page_size]`, slot
/// `pos % page_size`; its flat slot index (what `rope_kv_write` takes per token) is
/// `page * page_size + pos % page_size`. One (page, kv head) is `page_size` contiguous rows of
/// `head_dim` elements, so a KV head's rows of one page are one contiguous run of
/// `page_size · head_dim · 2` bytes; `head_dim` must be a multiple of 8 (16-byte rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Pages in the cache (of this layer).
    pub num_pages: u32,
    /// KV heads.
    pub kv_heads: u32,
    /// Tokens per page.
    pub page_size: u32,
    /// Elements per head row.
    pub head_dim: u32,
}

impl KvLayout {
    /// Elements of one layer's K (or V) array.
    pub const fn elems(&self) -> usize {
        self.num_pages as usize * self.kv_heads as usize * self.page_size as usize * self.head_dim as usize
    }
    /// Element offset of row (`page`, `kv_head`, `page_slot`).
    pub const fn row(&self, page: u32, kv_head: u32, page_slot: u32) -> usize {
        ((page as usize * self.kv_heads as usize + kv_head as usize) * self.page_size as usize + page_slot as usize)
            * self.head_dim as usize
    }
    /// Element offset of the row of flat slot `slot = page * page_size + page_slot`.
    pub const fn slot_row(&self, slot: u32, kv_head: u32) -> usize {
        self.row(slot / self.page_size, kv_head, slot % self.page_size)
    }
    /// The flat slot of position `pos` of a sequence with page table `pages`.
    pub fn slot_of(&self, pages: &[u32], pos: u32) -> u32 {
        pages[(pos / self.page_size) as usize] * self.page_size + pos % self.page_size
    }
}

/// Page-table words one `decode_attention` block stages in shared memory: the pages a split of at most
/// `max_chunk` tokens can touch (`max_chunk = ceil(max_context / splits)`).
pub const fn decode_pt_cap(max_chunk: u32, page_size: u32) -> u32 {
    max_chunk.div_ceil(page_size) + 1
}

/// Dynamic shared memory of `decode_attention`: the staged page table (`pt_cap` words, rounded to 16
/// bytes), then the K/V ring ([`DECODE_STAGES`] × [`DECODE_STAGE_BYTES`]), which the cross-warp merge
/// buffer (`DECODE_WARPS × group × (head_dim + 2)` f32, at most 33 KB) reuses after the token loop.
/// Over 48 KB: the CUDA backend opts the launch in (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
pub const fn decode_shared_bytes(pt_cap: u32, group: u32, head_dim: u32) -> u32 {
    let ring = DECODE_STAGES * DECODE_STAGE_BYTES;
    let merge = 4 * DECODE_WARPS * group * (head_dim + 2);
    (4 * pt_cap).div_ceil(16) * 16 + if ring > merge { ring } else { merge }
}

/// Threads per block of `sample_tokens` (one block per row).
pub const SAMPLE_THREADS: u32 = 512;

/// Per-row sampling parameters of `sample_tokens` (host-written, one per logits row).
///
/// `temperature <= 0` or `top_k == 1`: greedy (argmax, lowest index on ties). Otherwise the token is drawn
/// from `softmax(logits / temperature)` restricted to the top-k tokens (`top_k == 0` or `≥ vocab`: all;
/// ties at the k-th value are all kept), then to the smallest top-p prefix of those by probability
/// (`top_p ≥ 1` or `≤ 0`: all), by the Gumbel-max trick with noise from a counter-based hash of
/// (`seed`, `counter`, token id): the same parameters always give the same token.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(not(target_arch = "nvptx64"), derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SampleParams {
    /// Softmax temperature (≤ 0: greedy).
    pub temperature: f32,
    /// Nucleus mass in (0, 1) (otherwise off).
    pub top_p: f32,
    /// Top-k cut (0: off; 1: greedy).
    pub top_k: u32,
    /// Low word of the request's seed.
    pub seed_lo: u32,
    /// High word of the request's seed.
    pub seed_hi: u32,
    /// Draw counter (e.g. the position of the sampled token), so every step draws fresh noise.
    pub counter: u32,
    /// Padding, always 0.
    pub _pad: [u32; 2],
}

/// The order-preserving key of an f32 (larger float → larger key; NaN maps above +inf or below −inf by
/// its sign bit, callers exclude NaN themselves).
pub const fn f32_order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The sampler's uniform draw in (0, 1) for token `j`: murmur3's 32-bit finalizer over a mix of the seed,
/// the counter and the token id (24 random bits, centred in their interval: never 0 or 1).
pub const fn sample_uniform(seed_lo: u32, seed_hi: u32, counter: u32, j: u32) -> f32 {
    const fn fmix(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        h
    }
    let a = fmix(seed_lo ^ fmix(seed_hi.wrapping_add(0x9e37_79b9)));
    let b = fmix(a ^ counter.wrapping_mul(0x27d4_eb2f));
    let h = fmix(b ^ j.wrapping_mul(0x1656_67b1));
    ((h >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}
