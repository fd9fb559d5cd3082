//! Local storage on the data path: pooled I/O buffers, range locks that order overlapping
//! commands, writes done inline from the page cache, and the helper thread that takes
//! large writes off a saturated core.

pub mod allocation;
pub mod bufpool;
pub mod inline_write;
pub mod range_lock;
pub mod spill;
