//! Benchmarks and the `twinsan bench` load generator.
