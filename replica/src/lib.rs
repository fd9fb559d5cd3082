//! Peer replication (protocol C). Filled in by the replication issue.
