//! Criterion benchmarks for weir; see benches/README.md.
