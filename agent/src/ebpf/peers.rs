//! Peer name ↔ id for the LPM trie and the per-peer counters. Pure, unit-tested without a
//! kernel; the loader applies what it decides.
//!
//! Ids are reused, so node churn cannot grow the id space, but an id is only handed out again
//! once its leaving peer's kernel counters were harvested: a counter key never names two peers.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use agent_ebpf::PEER_UNKNOWN;
use ipnet::IpNet;

/// A block with its host bits cleared: a key of the IPv4 or the IPv6 LPM trie.
pub(crate) type TrieKey = IpNet;

/// What the LPM tries hold (or should): key → peer id, sorted by key, one entry per key. A
/// sorted vector rather than a map: at 30,000 blocks it is a third of a hash map's memory, and
/// the diff between two of them is one merge.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct TrieEntries(Vec<(TrieKey, u32)>);

impl TrieEntries {
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    fn position(&self, key: &TrieKey) -> Option<usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key)).ok()
    }

    #[cfg(test)]
    pub(crate) fn contains_key(&self, key: &TrieKey) -> bool {
        self.position(key).is_some()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &TrieKey> {
        self.0.iter().map(|(k, _)| k)
    }
}

#[cfg(test)]
impl std::ops::Index<&TrieKey> for TrieEntries {
    type Output = u32;

    fn index(&self, key: &TrieKey) -> &u32 {
        match self.position(key) {
            Some(at) => &self.0[at].1,
            None => panic!("{key} is not in the trie"),
        }
    }
}

/// How long a leaving peer's id waits before its counters are harvested: far longer than a
/// program run that looked the id up just before the trie changed.
pub(crate) const HARVEST_GRACE: Duration = Duration::from_secs(1);

/// Peer name ↔ id (ids from 1; 0 means unknown).
#[derive(Debug, Default, Clone)]
pub(crate) struct PeerIds {
    by_name: BTreeMap<String, u32>,
    /// Index `id - 1`; `None` for a free id.
    names: Vec<Option<String>>,
    free: BTreeSet<u32>,
    /// Ids no longer in the trie, since when: their counters still name them until harvested.
    draining: BTreeMap<u32, Instant>,
}

impl PeerIds {
    /// The peer's id; a new peer gets the lowest free id. A draining peer that comes back keeps
    /// its id (and its counters).
    pub(crate) fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.by_name.get(name) {
            self.draining.remove(id);
            return *id;
        }
        let id = match self.free.pop_first() {
            Some(id) => {
                self.names[id as usize - 1] = Some(name.to_string());
                id
            }
            None => {
                self.names.push(Some(name.to_string()));
                self.names.len() as u32
            }
        };
        self.by_name.insert(name.to_string(), id);
        id
    }

    pub(crate) fn name(&self, id: u32) -> Option<&str> {
        if id == PEER_UNKNOWN {
            return None;
        }
        self.names.get(id as usize - 1)?.as_deref()
    }

    /// Desired contents of both tries: key → peer id. A peer has one id for both families.
    /// When two peers claim the same prefix (a datastore conflict), the first wins,
    /// deterministically. Peers absent from `blocks` start draining.
    pub(crate) fn trie_entries(&mut self, blocks: &[(String, IpNet)], now: Instant) -> TrieEntries {
        let mut out: Vec<(TrieKey, u32)> = blocks
            .iter()
            .map(|(peer, net)| (net.trunc(), self.id(peer)))
            .collect();
        // Stable: of entries with the same key, the first stays first and is the one kept.
        out.sort_by_key(|entry| entry.0);
        out.dedup_by(|later, first| later.0 == first.0);
        out.shrink_to_fit();
        let in_trie: BTreeSet<u32> = out.iter().map(|(_, id)| *id).collect();
        for id in self.by_name.values() {
            if !in_trie.contains(id) {
                self.draining.entry(*id).or_insert(now);
            }
        }
        TrieEntries(out)
    }

    /// Ids that left the trie at least [`HARVEST_GRACE`] ago: no program counts to them any
    /// more, so their counters are final. A peer `coming_back` keeps its id instead.
    pub(crate) fn harvestable(&self, now: Instant, coming_back: impl Fn(&str) -> bool) -> Vec<u32> {
        self.draining
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= HARVEST_GRACE)
            .filter(|(id, _)| !self.name(**id).is_some_and(&coming_back))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The id's counters were harvested: forget its name and hand the id out again.
    pub(crate) fn release(&mut self, id: u32) {
        if self.draining.remove(&id).is_none() {
            return;
        }
        if let Some(name) = self.names.get_mut(id as usize - 1).and_then(Option::take) {
            self.by_name.remove(&name);
            self.free.insert(id);
        }
    }

    /// Ids ever allocated (the id space): bounded by the peers present at once.
    pub(crate) fn allocated(&self) -> usize {
        self.names.len()
    }
}

/// Entries to insert or overwrite, and keys to remove, to turn `current` into `desired`.
pub(crate) fn diff_trie(
    current: &TrieEntries,
    desired: &TrieEntries,
) -> (Vec<(TrieKey, u32)>, Vec<TrieKey>) {
    let (mut upserts, mut removals) = (Vec::new(), Vec::new());
    let (mut have, mut want) = (current.0.iter().peekable(), desired.0.iter().peekable());
    loop {
        match (have.peek(), want.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                removals.push(*k);
                have.next();
            }
            (None, Some(entry)) => {
                upserts.push(**entry);
                want.next();
            }
            (Some((hk, hv)), Some((wk, wv))) => match hk.cmp(wk) {
                std::cmp::Ordering::Less => {
                    removals.push(*hk);
                    have.next();
                }
                std::cmp::Ordering::Greater => {
                    upserts.push((*wk, *wv));
                    want.next();
                }
                std::cmp::Ordering::Equal => {
                    if hv != wv {
                        upserts.push((*wk, *wv));
                    }
                    have.next();
                    want.next();
                }
            },
        }
    }
    (upserts, removals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn peer_ids_are_stable_and_trie_diff_is_minimal() {
        let now = Instant::now();
        let mut peers = PeerIds::default();
        let first = peers.trie_entries(
            &[
                ("k8s02".into(), net("10.1.0.64/26")),
                ("k8s03".into(), net("10.1.235.128/26")),
                ("k8s03".into(), net("10.1.0.7/32")),
            ],
            now,
        );
        assert_eq!(first.len(), 3);
        let k3 = peers.by_name["k8s03"];
        assert_eq!(peers.name(k3), Some("k8s03"));
        assert_eq!(peers.name(PEER_UNKNOWN), None);
        assert_eq!(first[&net("10.1.235.128/26")], k3);

        // k8s02 leaves, k8s04 takes over its block; k8s03 unchanged.
        let second = peers.trie_entries(
            &[
                ("k8s04".into(), net("10.1.0.64/26")),
                ("k8s03".into(), net("10.1.235.128/26")),
                ("k8s03".into(), net("10.1.0.7/32")),
            ],
            now,
        );
        assert_eq!(peers.by_name["k8s03"], k3, "ids survive updates");
        let (upserts, removals) = diff_trie(&first, &second);
        assert_eq!(upserts, vec![(net("10.1.0.64/26"), peers.by_name["k8s04"])]);
        assert!(removals.is_empty());
        let (upserts, removals) = diff_trie(&second, &TrieEntries::default());
        assert!(upserts.is_empty());
        assert_eq!(removals.len(), 3);
    }

    proptest::proptest! {
        /// The merge diff says what a map-based one says: every key to write (new, or with
        /// another id) and every key to remove, nothing else.
        #[test]
        fn trie_diff_is_what_changed(
            current in proptest::collection::btree_map(0u32..64, 1u32..4, 0..40),
            desired in proptest::collection::btree_map(0u32..64, 1u32..4, 0..40),
        ) {
            let key = |i: u32| IpNet::new(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 6)).into(), 26).unwrap();
            let entries = |m: &BTreeMap<u32, u32>| TrieEntries(m.iter().map(|(k, v)| (key(*k), *v)).collect());
            let (upserts, removals) = diff_trie(&entries(&current), &entries(&desired));
            let want_upserts: Vec<(IpNet, u32)> = desired
                .iter()
                .filter(|(k, v)| current.get(k) != Some(v))
                .map(|(k, v)| (key(*k), *v))
                .collect();
            let want_removals: Vec<IpNet> = current
                .keys()
                .filter(|k| !desired.contains_key(k))
                .map(|k| key(*k))
                .collect();
            proptest::prop_assert_eq!(upserts, want_upserts);
            proptest::prop_assert_eq!(removals, want_removals);
        }
    }

    #[test]
    fn the_first_of_two_peers_claiming_a_block_keeps_it() {
        let mut peers = PeerIds::default();
        let e = peers.trie_entries(
            &[
                ("b".into(), net("10.1.0.64/26")),
                ("a".into(), net("10.1.0.0/26")),
                ("c".into(), net("10.1.0.64/26")),
            ],
            Instant::now(),
        );
        assert_eq!(e.len(), 2);
        assert_eq!(e[&net("10.1.0.64/26")], peers.id("b"));
        assert_eq!(e[&net("10.1.0.0/26")], peers.id("a"));
    }

    #[test]
    fn host_bits_are_truncated_in_trie_keys() {
        let mut peers = PeerIds::default();
        let e = peers.trie_entries(
            &[
                ("a".into(), net("10.1.0.70/26")),
                ("a".into(), net("fd10:1::17/122")),
            ],
            Instant::now(),
        );
        assert!(e.contains_key(&net("10.1.0.64/26")));
        assert!(e.contains_key(&net("fd10:1::/122")));
    }

    #[test]
    fn a_dual_stack_peer_has_one_id_for_both_families() {
        let mut peers = PeerIds::default();
        let e = peers.trie_entries(
            &[
                ("k8s03".into(), net("10.1.235.128/26")),
                ("k8s02".into(), net("fd10:2::/122")),
                ("k8s03".into(), net("fd10:3::/122")),
                ("k8s03".into(), net("fd10:2::5/128")),
            ],
            Instant::now(),
        );
        let k3 = peers.id("k8s03");
        assert_eq!(e[&net("10.1.235.128/26")], k3);
        assert_eq!(e[&net("fd10:3::/122")], k3);
        assert_eq!(
            e[&net("fd10:2::5/128")],
            k3,
            "a borrowed /128 names its borrower"
        );
        assert_ne!(e[&net("fd10:2::/122")], k3);
        assert_eq!(peers.allocated(), 2);
    }

    #[test]
    fn a_leaving_peer_keeps_its_id_until_harvested_then_the_id_is_reused() {
        let t0 = Instant::now();
        let mut peers = PeerIds::default();
        peers.trie_entries(&[("a".into(), net("10.1.0.0/26"))], t0);
        let a = peers.id("a");
        peers.trie_entries(&[("b".into(), net("10.1.0.64/26"))], t0);
        // Inside the grace period a's counters may still grow: its id is not harvestable and
        // still names it.
        assert!(peers.harvestable(t0, |_| false).is_empty());
        assert_eq!(peers.name(a), Some("a"));
        let later = t0 + HARVEST_GRACE;
        assert_eq!(peers.harvestable(later, |_| false), vec![a]);
        peers.release(a);
        assert_eq!(peers.name(a), None, "a harvested id names nobody");
        assert_eq!(peers.id("c"), a, "the lowest free id is reused");
        assert_eq!(peers.name(a), Some("c"));
        // Releasing an id that is not draining (c is live) does nothing.
        peers.release(a);
        assert_eq!(peers.name(a), Some("c"));
    }

    #[test]
    fn a_peer_that_comes_back_before_the_harvest_keeps_its_id() {
        let t0 = Instant::now();
        let mut peers = PeerIds::default();
        peers.trie_entries(&[("a".into(), net("10.1.0.0/26"))], t0);
        let a = peers.id("a");
        peers.trie_entries(&[], t0);
        peers.trie_entries(&[("a".into(), net("10.1.0.0/26"))], t0);
        assert!(peers.harvestable(t0 + HARVEST_GRACE, |_| false).is_empty());
        assert_eq!(peers.id("a"), a);
        // Draining past the grace, but named in the update being applied: not harvested.
        peers.trie_entries(&[], t0);
        assert!(peers
            .harvestable(t0 + HARVEST_GRACE, |n| n == "a")
            .is_empty());
    }

    #[test]
    fn churn_of_thousands_of_nodes_keeps_the_id_space_flat() {
        let mut now = Instant::now();
        let mut peers = PeerIds::default();
        for round in 0..2000u32 {
            // 50 nodes at a time, all replaced every round (autoscaling churn).
            let blocks: Vec<(String, IpNet)> = (0..50u32)
                .map(|i| {
                    let n = round * 50 + i;
                    (
                        format!("node-{n}"),
                        IpNet::new(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 6)).into(), 26)
                            .unwrap(),
                    )
                })
                .collect();
            // As the loader does: harvest what is final, then allocate.
            for id in peers.harvestable(now, |n| blocks.iter().any(|(b, _)| b == n)) {
                peers.release(id);
            }
            peers.trie_entries(&blocks, now);
            now += HARVEST_GRACE;
        }
        assert!(
            peers.allocated() <= 100,
            "id space grew with churn: {}",
            peers.allocated()
        );
        assert!(peers.by_name.len() <= 100 && peers.draining.len() <= 50);
    }
}
