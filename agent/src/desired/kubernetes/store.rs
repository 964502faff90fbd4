//! The watch cache of one resource, and the relist comparison that catches missed events.
//! Pure: no clocks, no I/O.

use std::collections::BTreeMap;

/// One cached object: its compact form and the resourceVersion it was last seen at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    pub rv: String,
    pub item: T,
}

/// Compact objects of one resource by name, plus the newest resourceVersion the cache reflects
/// (from the list, the last event or the last bookmark).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store<T> {
    pub items: BTreeMap<String, Entry<T>>,
    pub position: String,
    /// Objects the watch deleted, with the resourceVersion of their DELETED event: a relist
    /// taken before that deletion still lists them, and only these may be excused as "gone
    /// since". Bounded ([`MAX_TOMBSTONES`]) and pruned by each relist.
    tombstones: BTreeMap<String, String>,
}

/// At most this many deletions are remembered between two relists. A relist that finds more
/// listed-but-uncached objects than remembered deletions reports the rest as missed: a false
/// "stale" in an extreme deletion storm, never a missed ADDED excused.
pub const MAX_TOMBSTONES: usize = 4096;

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            items: BTreeMap::new(),
            position: String::new(),
            tombstones: BTreeMap::new(),
        }
    }
}

/// resourceVersions are opaque strings, but every real server (etcd, kine) uses integers.
/// Ordering is only used to excuse a difference, so "unknown" means "not newer".
pub fn rv_newer(a: &str, b: &str) -> bool {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

/// One way the watch cache disagrees with a fresh list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Present in both, different content: a MODIFIED event was missed.
    Changed(String),
    /// Listed but not cached: an ADDED event was missed.
    Missing(String),
    /// Cached but no longer listed: a DELETED event was missed.
    Lingering(String),
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Changed(n) => write!(f, "{n} changed"),
            Difference::Missing(n) => write!(f, "{n} added"),
            Difference::Lingering(n) => write!(f, "{n} deleted"),
        }
    }
}

impl<T: PartialEq + Clone> Store<T> {
    /// Compares the cache with a relist taken at `list.position`. Differences the cache can
    /// explain by being newer than the list (an event that arrived after the list was taken)
    /// are not counted: what remains is what the watch failed to deliver.
    pub fn differences(&self, list: &Store<T>) -> Vec<Difference> {
        let mut diffs = Vec::new();
        for (name, listed) in &list.items {
            match self.items.get(name) {
                Some(cached) if cached.item == listed.item => {}
                Some(cached) if rv_newer(&cached.rv, &list.position) => {}
                Some(_) => diffs.push(Difference::Changed(name.clone())),
                // Deleted after the list was taken, and the cache saw that deletion.
                None if self
                    .tombstones
                    .get(name)
                    .is_some_and(|rv| rv_newer(rv, &list.position)) => {}
                None => diffs.push(Difference::Missing(name.clone())),
            }
        }
        for (name, cached) in &self.items {
            if !list.items.contains_key(name) && !rv_newer(&cached.rv, &list.position) {
                diffs.push(Difference::Lingering(name.clone()));
            }
        }
        diffs
    }

    /// A DELETED event at `rv`: the object leaves the cache, its deletion is remembered.
    pub fn delete(&mut self, name: &str, rv: String) -> bool {
        let removed = self.items.remove(name).is_some();
        if self.tombstones.len() >= MAX_TOMBSTONES {
            // Forget the oldest deletion (numeric rvs; opaque ones sort first and go first).
            let oldest = self
                .tombstones
                .iter()
                .min_by_key(|(_, rv)| rv.parse::<u64>().unwrap_or(0))
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                self.tombstones.remove(&oldest);
            }
        }
        self.tombstones.insert(name.to_string(), rv.clone());
        self.position = rv;
        removed
    }

    /// An ADDED or MODIFIED event: a re-created object is no longer a tombstone.
    pub fn upsert(&mut self, name: &str, entry: Entry<T>) -> bool {
        self.tombstones.remove(name);
        self.position = entry.rv.clone();
        let changed = self.items.get(name).map(|e| &e.item) != Some(&entry.item);
        self.items.insert(name.to_string(), entry);
        changed
    }

    /// Every later relist is taken at or after `position`: deletions up to it excuse nothing.
    pub fn prune_tombstones(&mut self, position: &str) {
        self.tombstones.retain(|_, rv| rv_newer(rv, position));
    }

    /// Remembered deletions (for tests and status).
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Replaces the cache by the relist. Entries the cache had that are newer than the list
    /// need no keeping: the watch restarts from the list's position and replays them.
    pub fn replace(&mut self, list: Store<T>) {
        *self = list;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(pos: &str, items: &[(&str, &str, u32)]) -> Store<u32> {
        Store {
            position: pos.to_string(),
            tombstones: BTreeMap::new(),
            items: items
                .iter()
                .map(|(n, rv, v)| {
                    (
                        n.to_string(),
                        Entry {
                            rv: rv.to_string(),
                            item: *v,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn equal_content_is_no_difference_even_with_other_rvs() {
        let cache = store("10", &[("a", "5", 1)]);
        let list = store("12", &[("a", "11", 1)]);
        assert!(cache.differences(&list).is_empty());
    }

    #[test]
    fn missed_modify_add_and_delete_are_found() {
        let cache = store("10", &[("a", "5", 1), ("gone", "6", 7)]);
        let list = store("20", &[("a", "15", 2), ("new", "16", 3)]);
        let d = cache.differences(&list);
        assert_eq!(
            d,
            vec![
                Difference::Changed("a".into()),
                Difference::Missing("new".into()),
                Difference::Lingering("gone".into()),
            ]
        );
    }

    #[test]
    fn cache_newer_than_list_is_excused() {
        // The watch delivered a change, a creation and a deletion after the list was taken.
        let mut cache = store(
            "10",
            &[("a", "25", 2), ("born", "28", 1), ("died", "16", 3)],
        );
        cache.delete("died", "29".into());
        cache.position = "30".into();
        let list = store("20", &[("a", "15", 1), ("died", "16", 3)]);
        assert!(cache.differences(&list).is_empty());
    }

    #[test]
    fn missed_add_is_found_while_other_events_move_the_cache_ahead() {
        // A busy cluster: IPAM blocks change on every pod IP allocation, so the cache is
        // almost always ahead of any list. A block whose ADDED was lost must still show.
        let mut cache = store("10", &[("busy", "10", 1)]);
        cache.upsert(
            "busy",
            Entry {
                rv: "40".into(),
                item: 2,
            },
        );
        let list = store("30", &[("busy", "29", 1), ("missed", "25", 7)]);
        assert_eq!(
            cache.differences(&list),
            vec![Difference::Missing("missed".into())]
        );
    }

    #[test]
    fn a_deletion_before_the_list_excuses_nothing() {
        let mut cache = store("10", &[("x", "5", 1)]);
        cache.delete("x", "12".into());
        cache.position = "40".into();
        // Listed at 30 although deleted at 12: the list is right, the cache is wrong
        // about something else; and x re-created under the same name was missed.
        let list = store("30", &[("x", "20", 1)]);
        assert_eq!(
            cache.differences(&list),
            vec![Difference::Missing("x".into())]
        );
    }

    #[test]
    fn tombstones_are_bounded_and_pruned() {
        let mut cache: Store<u32> = Store::default();
        for i in 0..(MAX_TOMBSTONES as u64 + 100) {
            cache.delete(&format!("n{i}"), (i + 1).to_string());
        }
        assert_eq!(cache.tombstones(), MAX_TOMBSTONES);
        // The oldest were forgotten, the newest kept.
        assert!(!cache.tombstones.contains_key("n0"));
        assert!(cache
            .tombstones
            .contains_key(&format!("n{}", MAX_TOMBSTONES + 99)));
        cache.prune_tombstones(&(MAX_TOMBSTONES as u64).to_string());
        assert_eq!(cache.tombstones(), 100);
        // A re-created object is not a tombstone.
        cache.upsert(
            &format!("n{}", MAX_TOMBSTONES + 99),
            Entry {
                rv: "999999".into(),
                item: 1,
            },
        );
        assert_eq!(cache.tombstones(), 99);
    }

    #[test]
    fn opaque_rvs_are_never_newer() {
        assert!(!rv_newer("abc", "1"));
        assert!(rv_newer("10", "9"));
        assert!(!rv_newer("9", "10"));
    }
}
