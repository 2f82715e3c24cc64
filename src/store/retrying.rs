//! retrying store
