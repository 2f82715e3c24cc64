//! uri store
