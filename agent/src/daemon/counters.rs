//! The eBPF drop counters as the loop drives them: load (or the disabled fallback), the
//! watched devices, and the per-second read on a blocking thread, exported to the checks'
//! window, the status API and /metrics.

use super::*;

impl LoopState {
    pub(super) fn update_ebpf_devices(&mut self) {
        let now = self.engine.watched_ifindexes();
        if now != self.watched {
            debug!(?now, before = ?self.watched, "watched devices changed");
            match lock_counters(&self.ebpf).set_watched_devices(&now) {
                Ok(()) => self.watched = now,
                Err(e) => warn!(error = %e, "eBPF watched devices not updated"),
            }
        }
    }

    pub(super) async fn poll_drops(&mut self) {
        if !matches!(
            lock_counters(&self.ebpf).state(),
            EbpfState::Attached | EbpfState::Partial
        ) {
            return;
        }
        let counters = self.ebpf.clone();
        let read = tokio::task::spawn_blocking(move || lock_counters(&counters).snapshot()).await;
        let snapshot = match read {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(error = %e, "eBPF snapshot failed");
                return;
            }
            Err(e) => {
                warn!(error = %e, "eBPF snapshot task failed");
                return;
            }
        };
        let names: std::collections::BTreeMap<u32, String> = self
            .engine
            .observed()
            .devices
            .iter()
            .map(|(n, d)| (d.link.ifindex, n.clone()))
            .collect();
        let summary = self
            .window
            .observe(Instant::now(), &snapshot, |i| names.get(&i).cloned());
        self.engine.set_drops(summary);
        self.export_drops(&snapshot, &names).await;
    }

    pub(super) async fn export_drops(
        &mut self,
        snapshot: &DropSnapshot,
        names: &std::collections::BTreeMap<u32, String>,
    ) {
        let mut drops = serve::status::DropsStatus::default();
        for (ifindex, device) in names {
            for (reason, n) in snapshot.drops_by_reason(*ifindex) {
                self.metrics.observe_vxlan_drops_total(device, &reason, n);
                *drops.by_reason.entry(reason).or_default() += n;
                drops.total += n;
            }
            let failed = snapshot.neighbour_total(*ifindex, NeighTarget::Failed);
            let last = self
                .neigh_failed_last
                .entry((device.clone(), *ifindex))
                .or_insert(0);
            if failed > *last {
                self.metrics
                    .add_neighbour_unresolved(device, failed - *last);
                *last = failed;
            }
        }
        // Devices come and go (re-created with a new ifindex): keep only the watched ones.
        self.neigh_failed_last
            .retain(|(device, ifindex), _| names.get(ifindex) == Some(device));
        // Every peer with counters, including one that just left the datastore: its last
        // drops still count, and it is forgotten once its counters were harvested.
        let peers: std::collections::BTreeSet<&str> = snapshot
            .drops
            .iter()
            .filter(|d| d.class.is_data())
            .filter_map(|d| d.peer.as_deref())
            .collect();
        let mut totals = std::collections::BTreeMap::new();
        for peer in peers {
            let by_reason = snapshot.data_drops_to_peer(peer);
            totals.insert(peer.to_string(), by_reason.values().sum::<u64>());
            drops.by_peer.insert(peer.to_string(), by_reason);
        }
        if let Some(device) = self.engine.devices().first() {
            self.metrics.observe_peer_drops_totals(device, &totals);
        }
        // Writing every peer's entry each second was most of the idle daemon's CPU (perf: cache
        // misses over 5,000 entries); the totals rarely change.
        let peers_stale = self.status_peer_drops.as_ref() != Some(&totals);
        self.status
            .update(|s| {
                if peers_stale {
                    for p in Arc::make_mut(&mut s.peers) {
                        p.drops = totals.get(&p.name).copied().unwrap_or(0);
                    }
                }
                s.drops = drops;
            })
            .await;
        if peers_stale {
            self.status_peer_drops = Some(totals);
        }
    }
}

pub(super) fn open_ebpf(config: &Config, netns: Option<&Path>) -> Box<dyn DropCounterSource> {
    if config.ebpf.enabled {
        ebpf::open(netns)
    } else {
        disabled_ebpf(
            "disabled by configuration (ebpf.enabled = false)".into(),
            netns,
        )
    }
}

pub(super) fn disabled_ebpf(reason: String, netns: Option<&Path>) -> Box<dyn DropCounterSource> {
    Box::new(ebpf::Disabled::new(
        ebpf::EbpfStatus {
            state: EbpfState::Unavailable,
            missing: None,
            reason: Some(reason),
            programs: Vec::new(),
        },
        netns,
    ))
}

/// The drop counter source; a panic elsewhere while it was held leaves it usable.
pub(super) fn lock_counters(
    m: &std::sync::Mutex<Box<dyn DropCounterSource>>,
) -> std::sync::MutexGuard<'_, Box<dyn DropCounterSource>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
