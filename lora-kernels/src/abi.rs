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
