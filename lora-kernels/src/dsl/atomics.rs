//! Atomics and flag waits of the DSL, the same signature on both backends: 64-bit adds (the sampler's
//! shared-memory mass histograms) and the acquire load and bounded spin with which blocks of one launch
//! wait for each other's published results (the fused LoRA kernel's readiness counters).

/// Atomic add on a 64-bit word (generic address: global or shared); returns the old value.
/// Device: `atom.add.u64`. Host: `AtomicU64::fetch_add`.
///
/// # Safety
/// `p` valid and 8-byte aligned, only accessed atomically while other threads may touch it.
#[inline(always)]
pub unsafe fn atomic_add_u64(p: *mut u64, v: u64) -> u64 {
    #[cfg(target_arch = "nvptx64")]
    {
        let old: u64;
        // SAFETY: address validity is the caller's contract.
        unsafe {
            core::arch::asm!("atom.add.u64 {o}, [{p}], {v};", o = out(reg64) old, p = in(reg64) p, v = in(reg64) v)
        };
        old
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        // SAFETY: the caller guarantees a valid, aligned word that is only accessed atomically meanwhile.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(p).fetch_add(v, std::sync::atomic::Ordering::SeqCst) }
    }
}

/// Load a 32-bit word with acquire semantics at device scope: later loads of this thread see every write
/// that was released (e.g. by [`crate::dsl::threadfence`] and an atomic) before the value it reads.
/// Device: `ld.acquire.gpu.u32`. Host: `AtomicU32::load(Acquire)`.
///
/// # Safety
/// `p` valid and 4-byte aligned; other threads write it only atomically.
#[inline(always)]
pub unsafe fn load_acquire_u32(p: *const u32) -> u32 {
    #[cfg(target_arch = "nvptx64")]
    {
        let v: u32;
        // SAFETY: address validity is the caller's contract.
        unsafe { core::arch::asm!("ld.acquire.gpu.u32 {v}, [{p}];", v = out(reg32) v, p = in(reg64) p) };
        v
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        // SAFETY: the caller guarantees a valid, aligned word that others write only atomically.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(p as *mut u32).load(std::sync::atomic::Ordering::Acquire) }
    }
}

/// Wait until `*p >= target`, reading with [`load_acquire_u32`] (so the writes released before the counter
/// reached `target` are visible to this thread afterwards). Device: a poll with `nanosleep` back-off
/// between reads. Host: polls with a yield, and panics after 30 s — an emulated trap, reported as a
/// kernel error, never a hang — because there only a kernel bug can keep the counter below `target`.
///
/// # Safety
/// As [`load_acquire_u32`]; the counter must be bound to reach `target` by work that does not wait for this
/// thread (or the launch deadlocks on the device).
#[inline(always)]
pub unsafe fn spin_until_at_least(p: *const u32, target: u32) {
    #[cfg(target_arch = "nvptx64")]
    {
        // SAFETY: forwarded contract.
        while unsafe { load_acquire_u32(p) } < target {
            // SAFETY: no memory operands.
            unsafe { core::arch::asm!("nanosleep.u32 32;") };
        }
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        let start = std::time::Instant::now();
        // SAFETY: forwarded contract.
        while unsafe { load_acquire_u32(p) } < target {
            if start.elapsed() > std::time::Duration::from_secs(30) {
                panic!("spin wait timed out: the counter at {p:?} stayed below {target}");
            }
            std::thread::yield_now();
        }
    }
}
