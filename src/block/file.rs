//! File or block-device target: positional I/O on the primary disk (see mod.rs).
