//! Replay agent.
