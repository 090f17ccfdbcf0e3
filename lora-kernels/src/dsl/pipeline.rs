//! Grouped `cp.async` completion for multi-stage pipelines (the prefill kernel's double-buffered K/V
//! tiles, decode attention's K/V ring), the same signature on both backends. On the host, [`crate::dsl::cp_async_16`] copies
//! synchronously, so both are no-ops there.

/// `cp.async.commit_group`: close the group of this thread's `cp.async` issued since the last commit.
///
/// # Safety
/// None beyond those of the copies themselves.
#[inline(always)]
pub unsafe fn cp_async_commit() {
    #[cfg(target_arch = "nvptx64")]
    // SAFETY: no operands.
    unsafe {
        core::arch::asm!("cp.async.commit_group;")
    };
}

/// `cp.async.wait_group N`: wait until at most `N` of this thread's committed groups are still in flight
/// (`N` ≤ 7 here). The wait covers this thread's copies only: pair it with a block barrier before other
/// threads read the data (a thread reading only what it copied itself needs none).
///
/// # Safety
/// None beyond those of the copies themselves.
#[inline(always)]
pub unsafe fn cp_async_wait_group<const N: u32>() {
    #[cfg(target_arch = "nvptx64")]
    // SAFETY: an immediate operand only.
    unsafe {
        const { assert!(N <= 7, "cp_async_wait_group: N out of range") };
        core::arch::asm!("cp.async.wait_group {n};", n = const N)
    };
}
