//! The one operating-system call of the write log's memory reclamation: Linux's membarrier(2)
//! (Linux >= 4.14), which issues a full memory barrier on every running thread of the process.
//!
//! It lets the write hook order its accesses with plain stores and a compiler fence (no locked
//! instruction) while the one thread that frees memory pays for the barrier
//! (src/qsbr.rs explains the protocol).

#[cfg(target_os = "linux")]
use std::sync::OnceLock;

/// Asks which commands the kernel supports (a bit mask of them). Linux: MEMBARRIER_CMD_QUERY.
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
/// A barrier on the running threads of this process, by inter-processor interrupts. Linux:
/// MEMBARRIER_CMD_PRIVATE_EXPEDITED.
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
/// Declares the intent to use MEMBARRIER_CMD_PRIVATE_EXPEDITED (once per process). Linux:
/// MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED.
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

#[cfg(target_os = "linux")]
fn membarrier(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier takes two integers (command, flags) and a CPU id; it reads and writes
    // no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    }
}

/// Whether [`membarrier_private_expedited`] works in this process: queried and registered on
/// the first call (false off Linux, before 4.14, or when a seccomp filter refuses the call).
#[cfg(target_os = "linux")]
fn registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let cmds = membarrier(MEMBARRIER_CMD_QUERY);
        cmds >= 0
            && cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
            && cmds & MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED != 0
            && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
    })
}

/// Whether [`membarrier_private_expedited`] works in this process (registers it on the first
/// call).
pub(crate) fn membarrier_available() -> bool {
    #[cfg(target_os = "linux")]
    {
        registered()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Issues a full memory barrier on every thread of this process that runs at the moment (a
/// thread that does not run passes one when it is scheduled again): when this returns true,
/// each other thread's memory accesses before its barrier point are visible to the caller,
/// and its accesses after that point see everything the caller did before the call. Returns
/// false, having done nothing, where the kernel does not offer it.
pub(crate) fn membarrier_private_expedited() -> bool {
    #[cfg(target_os = "linux")]
    {
        registered() && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn membarrier_works_here() {
        // Linux >= 4.14 everywhere this project builds; the memory figures assume it.
        assert!(super::membarrier_private_expedited());
        assert!(super::membarrier_private_expedited());
    }
}
