//! Pure checks: (desired, observed, counters) → findings. No I/O.
