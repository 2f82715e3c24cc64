//! Writer: memory pool, journal writer, region tracker, primary core.
