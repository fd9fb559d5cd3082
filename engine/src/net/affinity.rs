//! Placement of helper threads relative to the pinned core threads.
//!
//! A core thread owns one CPU. The threads that work for it (its replica link's writer and
//! ack reader, and on the peer the thread applying that link's writes) are busiest exactly
//! when that core is, so running them on its CPU takes time from the one thread that gates
//! every command of its sessions. Measured on the 2-vCPU loopback pair (docs/performance.md):
//! keeping them off the core's CPU raised replicated 4 KiB writes at queue depth 32 from
//! 152-173K to 179-200K IOPS.

/// Removes `cpu` from the calling thread's allowed CPUs, unless that would leave none (a
/// one-CPU machine, or a thread already confined to that CPU). Placement is an
/// optimisation: failure is reported, never fatal.
pub fn keep_off_cpu(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Ok(());
    }
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is a plain bit array; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of `size` bytes; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `cpu` < CPU_SETSIZE (checked above), so the bit lies inside `set`.
    let (allowed, count) = unsafe { (libc::CPU_ISSET(cpu, &set), libc::CPU_COUNT(&set)) };
    if !allowed || count < 2 {
        return Ok(());
    }
    // SAFETY: as above, the bit lies inside `set`.
    unsafe { libc::CPU_CLR(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of `size` bytes; pid 0 is this thread.
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<usize> {
        // SAFETY: as in keep_off_cpu.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: as in keep_off_cpu.
        assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut set) }, 0);
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: i < CPU_SETSIZE.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
            .collect()
    }

    #[test]
    fn a_helper_leaves_its_cores_cpu_but_never_ends_up_with_none() {
        std::thread::spawn(|| {
            let before = allowed();
            let cpu = before[0];
            keep_off_cpu(cpu).unwrap();
            let after = allowed();
            if before.len() > 1 {
                assert!(!after.contains(&cpu), "{after:?} still holds {cpu}");
                assert_eq!(after.len(), before.len() - 1);
                // Down to one CPU: asking to leave it changes nothing.
                for &c in &after[..after.len() - 1] {
                    keep_off_cpu(c).unwrap();
                }
                let last = allowed();
                assert_eq!(last.len(), 1);
                keep_off_cpu(last[0]).unwrap();
                assert_eq!(allowed(), last);
            } else {
                assert_eq!(after, before);
            }
        })
        .join()
        .unwrap();
    }
}
