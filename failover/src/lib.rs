//! Failover controller. Filled in by the failover issue.

// Sans-I/O: nothing here needs `unsafe`, and the compiler keeps it that way.
#![forbid(unsafe_code)]
