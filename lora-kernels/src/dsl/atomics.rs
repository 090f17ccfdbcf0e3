//! 64-bit integer atomics of the DSL (the sampler's shared-memory mass histograms), the same signature on
//! both backends.

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
