//! Failover controller. Filled in by the failover issue.
