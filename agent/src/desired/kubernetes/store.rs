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
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            items: BTreeMap::new(),
            position: String::new(),
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
        let cache_ahead = rv_newer(&self.position, &list.position);
        for (name, listed) in &list.items {
            match self.items.get(name) {
                Some(cached) if cached.item == listed.item => {}
                Some(cached) if rv_newer(&cached.rv, &list.position) => {}
                Some(_) => diffs.push(Difference::Changed(name.clone())),
                // Deleted after the list, and the cache already saw the deletion.
                None if cache_ahead => {}
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
        let cache = store("30", &[("a", "25", 2), ("born", "28", 1)]);
        let list = store("20", &[("a", "15", 1), ("died", "16", 3)]);
        assert!(cache.differences(&list).is_empty());
    }

    #[test]
    fn opaque_rvs_are_never_newer() {
        assert!(!rv_newer("abc", "1"));
        assert!(rv_newer("10", "9"));
        assert!(!rv_newer("9", "10"));
    }
}
