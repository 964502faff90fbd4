//! The maps: what user space writes (watched device slots, the peer trie, its generation) and
//! reads back (device, per-peer, neighbour and overflow counters), keeping per-peer totals
//! monotonic while slots and peer ids are reused.

use std::collections::{BTreeMap, BTreeSet};

use agent_ebpf::{
    device_drop_index, NeighKey, PeerDropKey, PeerPending, CLASSES, CLASS_IPV4, CLASS_IPV6,
    CONFIG_MAP, CONFIG_PEER_GENERATION, DEVICE_DROPS_MAP, NEIGH_DEVICE_MAP, NEIGH_GATEWAY_MAP,
    OVERFLOW_HEADER_UNREADABLE, OVERFLOW_MAP, OVERFLOW_NEIGH, OVERFLOW_PEER_DROPS,
    PEER_BLOCKS_CAPACITY, PEER_BLOCKS_MAP, PEER_BLOCKS_V6_CAPACITY, PEER_BLOCKS_V6_MAP,
    PEER_DROPS_MAP, PEER_PENDING_MAP, PEER_UNKNOWN, REASON_SLOTS, WATCHED_DEVICES_CAPACITY,
    WATCHED_DEVICES_MAP,
};
use aya::{
    maps::{
        lpm_trie::Key, Array, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
        PerCpuValues,
    },
    Pod,
};
use ipnet::IpNet;

use super::EbpfDropCounters;
use crate::ebpf::{
    peers::diff_trie,
    snapshot::{build_snapshot, diff_slots, reason_slot, RawDrop, PEER_DEPARTED},
    DropCounterSource, DropSnapshot, EbpfError, EbpfStatus, Overflow, RETIRED_IFINDEX,
};

impl DropCounterSource for EbpfDropCounters {
    fn status(&self) -> EbpfStatus {
        self.status.clone()
    }

    fn state(&self) -> crate::ebpf::EbpfState {
        self.status.state
    }

    fn set_watched_devices(&mut self, ifindexes: &BTreeSet<u32>) -> Result<(), EbpfError> {
        if ifindexes.len() > WATCHED_DEVICES_CAPACITY as usize || ifindexes.contains(&0) {
            return Err(EbpfError::TooManyDevices {
                count: ifindexes.len(),
                capacity: WATCHED_DEVICES_CAPACITY,
            });
        }
        let (remove, add) = diff_slots(&self.slots, ifindexes);
        for slot in remove {
            // Stop counting, harvest what the slot counted (its ifindex is still known here),
            // then free it: the other order found the slot empty and lost the counts.
            self.write_kernel_slot(slot, 0)?;
            self.retire_slot(slot)?;
            self.slots[slot as usize] = 0;
        }
        for ifindex in add {
            let slot = self
                .slots
                .iter()
                .position(|s| *s == 0)
                .expect("capacity checked above") as u32;
            self.write_slot(slot, ifindex)?;
        }
        Ok(())
    }

    fn set_peer_blocks(&mut self, blocks: &[(String, IpNet)]) -> Result<(), EbpfError> {
        let now = std::time::Instant::now();
        // Harvest first, so the ids freed are reused by this very update.
        let incoming: BTreeSet<&str> = blocks.iter().map(|(name, _)| name.as_str()).collect();
        self.harvest_departed(now, |name| incoming.contains(name))?;
        let desired = self.peers.trie_entries(blocks, now);
        let v6 = desired.keys().filter(|k| k.addr().is_ipv6()).count();
        for (count, capacity) in [
            (desired.len() - v6, PEER_BLOCKS_CAPACITY),
            (v6, PEER_BLOCKS_V6_CAPACITY),
        ] {
            if count > capacity as usize {
                return Err(EbpfError::TooManyBlocks { count, capacity });
            }
        }
        let (upserts, removals) = diff_trie(&self.trie, &desired);
        // Removals first: with both at capacity, an insert must not find the trie full.
        for key in &removals {
            match key {
                IpNet::V4(net) => {
                    let (mut trie, err) =
                        self.open_mut::<LpmTrie<&mut MapData, u32, u32>>(PEER_BLOCKS_MAP)?;
                    let key = Key::new(net.prefix_len().into(), v4_key(net.network()));
                    ignore_missing(trie.remove(&key)).map_err(err)?;
                }
                IpNet::V6(net) => {
                    let (mut trie, err) =
                        self.open_mut::<LpmTrie<&mut MapData, [u8; 16], u32>>(PEER_BLOCKS_V6_MAP)?;
                    let key = Key::new(net.prefix_len().into(), net.network().octets());
                    ignore_missing(trie.remove(&key)).map_err(err)?;
                }
            }
        }
        for (key, id) in &upserts {
            match key {
                IpNet::V4(net) => {
                    let (mut trie, err) =
                        self.open_mut::<LpmTrie<&mut MapData, u32, u32>>(PEER_BLOCKS_MAP)?;
                    let key = Key::new(net.prefix_len().into(), v4_key(net.network()));
                    trie.insert(&key, id, 0).map_err(err)?;
                }
                IpNet::V6(net) => {
                    let (mut trie, err) =
                        self.open_mut::<LpmTrie<&mut MapData, [u8; 16], u32>>(PEER_BLOCKS_V6_MAP)?;
                    let key = Key::new(net.prefix_len().into(), net.network().octets());
                    trie.insert(&key, id, 0).map_err(err)?;
                }
            }
        }
        self.trie = desired;
        // After the trie changed: invalidates the programs' per-CPU lookup caches.
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let (mut config, err) = self.open_mut::<Array<&mut MapData, u32>>(CONFIG_MAP)?;
        config
            .set(CONFIG_PEER_GENERATION, generation, 0)
            .map_err(err)?;
        Ok(())
    }

    fn snapshot(&self) -> Result<DropSnapshot, EbpfError> {
        if let Some(log) = &self.kernel_log {
            if let Ok(mut log) = log.lock() {
                log.flush();
            }
        }
        let mut raw_drops = self.read_drops(None)?;
        for (key, n) in &self.retired {
            *raw_drops.entry(*key).or_default() += n;
        }
        let mut neigh = Vec::new();
        for map_name in [NEIGH_DEVICE_MAP, NEIGH_GATEWAY_MAP] {
            let (map, err) = self.open::<PerCpuHashMap<&MapData, NeighKey, u64>>(map_name)?;
            for entry in map.iter() {
                let (key, values) = entry.map_err(err)?;
                neigh.push((key, values.iter().sum::<u64>()));
            }
        }
        let (overflow_map, err) = self.open::<PerCpuArray<&MapData, u64>>(OVERFLOW_MAP)?;
        let slot = |i: u32| -> Result<u64, EbpfError> {
            Ok(overflow_map.get(&i, 0).map_err(err)?.iter().sum())
        };
        let overflow = Overflow {
            drops_map_full: slot(OVERFLOW_PEER_DROPS)?,
            neigh_map_full: slot(OVERFLOW_NEIGH)?,
            header_unreadable: slot(OVERFLOW_HEADER_UNREADABLE)?,
        };
        Ok(build_snapshot(
            &self.reasons,
            &self.peers,
            raw_drops.into_iter().collect(),
            neigh,
            overflow,
        ))
    }
}

impl EbpfDropCounters {
    /// Every (class, reason) total of one device slot, summed over CPUs, in
    /// [`device_drop_index`] order: one batch lookup, or (kernels before 5.6) one lookup
    /// per entry.
    fn device_totals(&self, slot: u32) -> Result<Vec<u64>, EbpfError> {
        let first = device_drop_index(slot, 0, 0);
        let count = CLASSES * REASON_SLOTS;
        let map = self
            .bpf
            .map(DEVICE_DROPS_MAP)
            .ok_or(EbpfError::MissingMap(DEVICE_DROPS_MAP))?;
        if let (Map::PerCpuArray(data), Some(cpus)) = (map, self.possible_cpus) {
            match super::batch::per_cpu_sums(data.fd(), first, count, cpus) {
                Ok(totals) => return Ok(totals),
                Err(e) => tracing::debug!(error = %e, "batch lookup failed; one entry at a time"),
            }
        }
        let (device, err) = self.open::<PerCpuArray<&MapData, u64>>(DEVICE_DROPS_MAP)?;
        (first..first + count)
            .map(|i| Ok(device.get(&i, 0).map_err(err)?.iter().sum()))
            .collect()
    }

    /// Map `name` as the typed view `M` (e.g. `PerCpuArray<&MapData, u64>`), and the error
    /// context for later operations on it: aya's errors do not say which map they concern.
    fn open<'a, M>(
        &'a self,
        name: &'static str,
    ) -> Result<(M, impl Fn(MapError) -> EbpfError + Copy), EbpfError>
    where
        M: TryFrom<&'a Map, Error = MapError>,
    {
        let map = self.bpf.map(name).ok_or(EbpfError::MissingMap(name))?;
        let err = map_error(name);
        Ok((M::try_from(map).map_err(err)?, err))
    }

    /// As [`Self::open`], for writing.
    fn open_mut<'a, M>(
        &'a mut self,
        name: &'static str,
    ) -> Result<(M, impl Fn(MapError) -> EbpfError + Copy), EbpfError>
    where
        M: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self.bpf.map_mut(name).ok_or(EbpfError::MissingMap(name))?;
        let err = map_error(name);
        Ok((M::try_from(map).map_err(err)?, err))
    }

    fn write_slot(&mut self, slot: u32, ifindex: u32) -> Result<(), EbpfError> {
        self.write_kernel_slot(slot, ifindex)?;
        self.slots[slot as usize] = ifindex;
        Ok(())
    }

    /// The kernel side of a slot only; `self.slots` is the caller's.
    fn write_kernel_slot(&mut self, slot: u32, ifindex: u32) -> Result<(), EbpfError> {
        let (mut map, err) = self.open_mut::<Array<&mut MapData, u32>>(WATCHED_DEVICES_MAP)?;
        map.set(slot, ifindex, 0).map_err(err)
    }

    /// Moves the counters of a slot that is no longer watched into `retired` and zeroes them,
    /// so the slot can serve another device.
    fn retire_slot(&mut self, slot: u32) -> Result<(), EbpfError> {
        for (key, n) in self.read_drops(Some(slot))? {
            let key = RawDrop {
                ifindex: RETIRED_IFINDEX,
                ..key
            };
            *self.retired.entry(key).or_default() += n;
        }
        self.departed.retain(|(s, _, _), _| *s != slot);
        let (mut device, err) =
            self.open_mut::<PerCpuArray<&mut MapData, u64>>(DEVICE_DROPS_MAP)?;
        let ncpu = device.get(&0, 0).map_err(err)?.len();
        for class in 0..CLASSES {
            for reason in 0..REASON_SLOTS {
                let zeros = per_cpu_zeros(DEVICE_DROPS_MAP, ncpu)?;
                device
                    .set(device_drop_index(slot, class, reason), zeros, 0)
                    .map_err(err)?;
            }
        }
        let (mut peers, err) =
            self.open_mut::<PerCpuHashMap<&mut MapData, PeerDropKey, u64>>(PEER_DROPS_MAP)?;
        let keys: Vec<PeerDropKey> = peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.slot == slot)
            .collect();
        for key in keys {
            ignore_missing(peers.remove(&key)).map_err(err)?;
        }
        let (mut pending, err) =
            self.open_mut::<PerCpuArray<&mut MapData, PeerPending>>(PEER_PENDING_MAP)?;
        let zeros = per_cpu_zeros(PEER_PENDING_MAP, ncpu)?;
        pending.set(slot, zeros, 0).map_err(err)?;
        if let Ok(mut reported) = self.peer_reported.lock() {
            reported.retain(|k, _| k.slot != slot);
        }
        Ok(())
    }

    /// Counters of the watched slots (or of one slot), per device, reason, class and peer.
    /// Data drops not attributed to a peer are the device total minus the per-peer ones.
    fn read_drops(&self, only: Option<u32>) -> Result<BTreeMap<RawDrop, u64>, EbpfError> {
        let wanted = |slot: u32| only.is_none_or(|o| o == slot) && self.slots[slot as usize] != 0;
        // Per-peer counts first: the device totals read afterwards can only be larger, so the
        // unattributed remainder never goes negative.
        let (peers, err) =
            self.open::<PerCpuHashMap<&MapData, PeerDropKey, u64>>(PEER_DROPS_MAP)?;
        let mut per_peer: BTreeMap<PeerDropKey, u64> = BTreeMap::new();
        for entry in peers.iter() {
            let (key, values) = entry.map_err(err)?;
            if (key.slot as usize) < self.slots.len() && wanted(key.slot) {
                *per_peer.entry(key).or_default() += values.iter().sum::<u64>();
            }
        }
        // Pending counts after the hash (see PeerPending: this order never counts one twice).
        let (pending, err) = self.open::<PerCpuArray<&MapData, PeerPending>>(PEER_PENDING_MAP)?;
        for slot in 0..WATCHED_DEVICES_CAPACITY {
            if !wanted(slot) {
                continue;
            }
            for p in pending.get(&slot, 0).map_err(err)?.iter() {
                if p.count != 0 && p.peer != PEER_UNKNOWN {
                    let key = PeerDropKey {
                        slot,
                        class: p.class,
                        reason: p.reason,
                        peer: p.peer,
                    };
                    *per_peer.entry(key).or_default() += p.count;
                }
            }
        }
        if let Ok(mut reported) = self.peer_reported.lock() {
            keep_monotonic(&mut reported, &mut per_peer, |k| wanted(k.slot));
        }
        let mut out = BTreeMap::new();
        for slot in 0..WATCHED_DEVICES_CAPACITY {
            if !wanted(slot) {
                continue;
            }
            let ifindex = self.slots[slot as usize];
            let totals = self.device_totals(slot)?;
            for class in 0..CLASSES {
                for reason in 0..REASON_SLOTS {
                    let total = totals[(class * REASON_SLOTS + reason) as usize];
                    if total == 0 {
                        continue;
                    }
                    let mut unattributed = total;
                    if class == CLASS_IPV4 || class == CLASS_IPV6 {
                        for (&(_, _, raw_reason), n) in
                            self.departed.iter().filter(|((s, c, r), _)| {
                                *s == slot && *c == class && reason_slot(*r) == reason
                            })
                        {
                            let raw = RawDrop {
                                ifindex,
                                reason: raw_reason,
                                class,
                                peer: PEER_DEPARTED,
                            };
                            *out.entry(raw).or_default() += n;
                            unattributed = unattributed.saturating_sub(*n);
                        }
                        for (key, n) in per_peer.iter().filter(|(k, _)| {
                            k.slot == slot && k.class == class && reason_slot(k.reason) == reason
                        }) {
                            let raw = RawDrop {
                                ifindex,
                                reason: key.reason,
                                class,
                                peer: key.peer,
                            };
                            *out.entry(raw).or_default() += n;
                            unattributed = unattributed.saturating_sub(*n);
                        }
                    }
                    if unattributed > 0 {
                        let raw = RawDrop {
                            ifindex,
                            reason,
                            class,
                            peer: PEER_UNKNOWN,
                        };
                        *out.entry(raw).or_default() += unattributed;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Harvests the counters of peers that left the trie more than the grace period ago, so
    /// their ids can be reused: their per-peer entries are removed from the kernel and their
    /// counts kept as `departed` (device totals stay exact and monotonic). An id a CPU still
    /// holds a pending count for waits (at most CPUs × devices of them).
    fn harvest_departed(
        &mut self,
        now: std::time::Instant,
        coming_back: impl Fn(&str) -> bool,
    ) -> Result<(), EbpfError> {
        let mut ready: BTreeSet<u32> = self
            .peers
            .harvestable(now, coming_back)
            .into_iter()
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let (pending, err) = self.open::<PerCpuArray<&MapData, PeerPending>>(PEER_PENDING_MAP)?;
        for slot in 0..WATCHED_DEVICES_CAPACITY {
            for p in pending.get(&slot, 0).map_err(err)?.iter() {
                if p.count != 0 {
                    ready.remove(&p.peer);
                }
            }
        }
        let mut harvested: Vec<(PeerDropKey, u64)> = Vec::new();
        {
            let (map, err) =
                self.open::<PerCpuHashMap<&MapData, PeerDropKey, u64>>(PEER_DROPS_MAP)?;
            for entry in map.iter() {
                let (key, values) = entry.map_err(err)?;
                if ready.contains(&key.peer) {
                    harvested.push((key, values.iter().sum()));
                }
            }
        }
        {
            let (mut map, err) =
                self.open_mut::<PerCpuHashMap<&mut MapData, PeerDropKey, u64>>(PEER_DROPS_MAP)?;
            for (key, _) in &harvested {
                ignore_missing(map.remove(key)).map_err(err)?;
            }
        }
        let mut reported = self.peer_reported.lock().unwrap_or_else(|e| e.into_inner());
        for (key, n) in harvested {
            let n = n.max(reported.remove(&key).unwrap_or(0));
            if (key.slot as usize) < self.slots.len() && self.slots[key.slot as usize] != 0 {
                *self
                    .departed
                    .entry((key.slot, key.class, key.reason))
                    .or_default() += n;
            }
        }
        reported.retain(|k, _| !ready.contains(&k.peer));
        drop(reported);
        // Retired devices' counts for these peers: departed too.
        let moved: Vec<(RawDrop, u64)> = self
            .retired
            .iter()
            .filter(|(k, _)| ready.contains(&k.peer))
            .map(|(k, n)| (*k, *n))
            .collect();
        for (key, n) in moved {
            self.retired.remove(&key);
            let key = RawDrop {
                peer: PEER_DEPARTED,
                ..key
            };
            *self.retired.entry(key).or_default() += n;
        }
        for id in ready {
            self.peers.release(id);
        }
        Ok(())
    }
}

/// The IPv4 trie's key data: the address's network-order bytes in a u32, as the kernel holds it.
fn v4_key(addr: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Names the map an aya error concerns.
fn map_error(map: &'static str) -> impl Fn(MapError) -> EbpfError + Copy {
    move |source| EbpfError::Map { map, source }
}

/// Removing a key that is already gone is not an error: the map ends up as wanted.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// One zero per CPU: the value that resets a per-CPU slot of `map`.
fn per_cpu_zeros<T: Pod + Default>(
    map: &'static str,
    ncpu: usize,
) -> Result<PerCpuValues<T>, EbpfError> {
    PerCpuValues::try_from(vec![T::default(); ncpu])
        .map_err(|source| EbpfError::MapIo { map, source })
}

/// Raises each count to the highest reported before for its key and remembers the new highs.
/// Exact after any quiet moment: the kernel's hash + pending sum is then the true count, and a
/// clamped value was a true count at an earlier read.
/// Only keys for which `read` holds were read this time.
fn keep_monotonic(
    reported: &mut BTreeMap<PeerDropKey, u64>,
    counts: &mut BTreeMap<PeerDropKey, u64>,
    read: impl Fn(&PeerDropKey) -> bool,
) {
    for (key, high) in reported.iter().filter(|(k, _)| read(k)) {
        let n = counts.entry(*key).or_default();
        *n = (*n).max(*high);
    }
    for (key, n) in counts.iter() {
        reported.insert(*key, *n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_counts_never_go_backwards() {
        let key = |slot, peer| PeerDropKey {
            slot,
            class: CLASS_IPV4,
            reason: 73,
            peer,
        };
        let mut reported = BTreeMap::new();
        let mut first = BTreeMap::from([(key(0, 1), 10), (key(1, 2), 4)]);
        keep_monotonic(&mut reported, &mut first, |_| true);
        assert_eq!(first[&key(0, 1)], 10);
        // A read that missed 6 counts in flight from pending to hash, and whose key vanished
        // from both for a moment: both are held at what was reported.
        let mut torn = BTreeMap::from([(key(0, 1), 4)]);
        keep_monotonic(&mut reported, &mut torn, |k| k.slot == 0);
        assert_eq!(
            torn,
            BTreeMap::from([(key(0, 1), 10)]),
            "slot 1 was not read"
        );
        let mut torn_all = BTreeMap::new();
        keep_monotonic(&mut reported, &mut torn_all, |_| true);
        assert_eq!(torn_all[&key(1, 2)], 4);
        // Once the move landed, the true (larger) count is reported again, not added twice.
        let mut later = BTreeMap::from([(key(0, 1), 12), (key(1, 2), 4)]);
        keep_monotonic(&mut reported, &mut later, |_| true);
        assert_eq!(later, BTreeMap::from([(key(0, 1), 12), (key(1, 2), 4)]));
    }
}
