//! The failover clock: CLOCK_BOOTTIME in milliseconds.
//!
//! Why BOOTTIME and not MONOTONIC (what `Instant` reads): MONOTONIC stops while the machine
//! is suspended (a VM paused by its hypervisor, a laptop lid), BOOTTIME does not. A lease
//! counted on MONOTONIC would still look valid to a primary resumed after its peer took
//! over; on BOOTTIME it has ended, and the write path refuses to answer alone.

/// Milliseconds of CLOCK_BOOTTIME.
pub fn boot_clock_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and
    // CLOCK_BOOTTIME is supported on every Linux this daemon runs on (2.6.39+).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    // Cannot fail with a valid clock id and pointer; were it to, 0 makes every lease look
    // ended (the safe side: writes alone are held).
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1000) + (ts.tv_nsec as u64) / 1_000_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_clock_moves_forward_with_real_time() {
        let a = super::boot_clock_ms();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = super::boot_clock_ms();
        assert!(b >= a + 19, "{a} -> {b}");
    }
}
