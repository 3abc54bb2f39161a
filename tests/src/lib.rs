//! Support code for the cross-crate integration tests in `tests/tests/`.
