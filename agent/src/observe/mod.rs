//! Kernel state from netlink: dump and multicast monitor of overlay devices, routes, neighbours and FDB → `model::ObservedState`.
