//! Trim.
