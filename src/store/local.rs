//! local store
