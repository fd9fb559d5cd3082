//! SCSI status codes (SAM-5 section 5.3).

/// The command completed.
pub const GOOD: u8 = 0x00;
/// Sense data describes why the command failed.
pub const CHECK_CONDITION: u8 = 0x02;
/// PRE-FETCH: the range fits the cache.
pub const CONDITION_MET: u8 = 0x04;
/// The logical unit is busy; the initiator retries.
pub const BUSY: u8 = 0x08;
/// A persistent reservation held by another I_T nexus forbids the command.
pub const RESERVATION_CONFLICT: u8 = 0x18;
/// The task set is full; the initiator retries with fewer commands outstanding.
pub const TASK_SET_FULL: u8 = 0x28;
