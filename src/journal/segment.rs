//! Segment codec (see the layout on `SegmentHeader`).
