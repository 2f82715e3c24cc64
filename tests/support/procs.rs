//! Processes started by tests, killed by pid on drop.
