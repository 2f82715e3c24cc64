//! flaky store
