//! eBPF: BTF offsets, load/attach, drop and neighbour counters.
