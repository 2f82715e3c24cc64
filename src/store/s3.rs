//! s3 store
