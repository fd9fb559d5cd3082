//! Local storage on the data path: which chunks of a LUN may hold data, pooled I/O buffers, range locks that order overlapping
//! commands, writes done inline from the page cache, and the helper thread that takes
//! large writes off a saturated core.

pub mod alloc_map;
pub mod allocation;
pub mod bufpool;
pub mod durable;
pub mod fiemap;
pub mod inline_write;
pub mod range_lock;
pub mod spill;
pub mod thin_read;
