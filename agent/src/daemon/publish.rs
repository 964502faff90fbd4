//! After each evaluation: the [`FindingsDelta`] to the consumers, the log lines of what opened
//! and cleared, and systemd's status/readiness.

use super::*;

impl LoopState {
    pub(super) async fn evaluate_and_publish(&mut self) {
        let now = SystemTime::now();
        if let Some(link) = &self.repair {
            link.offer_desired(self.engine.desired());
            // The Kubernetes source reports staleness as a finding; a file is stale when its
            // last successful load is older than stale_after (it keeps failing to load).
            let stale_after = self.config.datastore.stale_after;
            let file_stale = (self.kube.is_none() && !self.offline)
                .then_some(self.last_desired_ok)
                .flatten()
                .map(|ok| ok.elapsed())
                .filter(|age| *age > stale_after)
                .map(|age| {
                    format!(
                        "its last successful load was {} ago (stale_after {})",
                        humantime::format_duration(Duration::from_secs(age.as_secs())),
                        humantime::format_duration(stale_after)
                    )
                });
            link.set_datastore_down(file_stale);
            self.engine.set_extra_findings(link.contested());
        }
        let Evaluation {
            report,
            mut open,
            verdicts,
            recomputed,
            mut transitions,
            duration,
        } = self.engine.evaluate(now);
        if let Some(link) = &self.repair {
            // What repair did travels with each finding (cleared ones too: "fixed by repair").
            // Annotating writes: the tracker's shared list is copied for it (repair mode only).
            // Opened and changed findings are positions in it.
            link.annotate(Arc::make_mut(&mut open).iter_mut());
            let cleared = std::mem::take(&mut transitions.cleared);
            transitions.cleared = link.settle_cleared(cleared, &open);
        }
        // Only a full evaluation builds (and frees) structures over the whole model.
        self.heap_dirty |= recomputed.rebuilt;
        self.window
            .acknowledge_explained(self.engine.explained_drops());
        for f in transitions.opened.iter().filter_map(|&i| open.get(i)) {
            log_opened(f);
        }
        for f in &transitions.cleared {
            log_cleared(f);
        }
        self.metrics.observe_check_duration(duration);
        let summary = Summary::of(&open);
        let devices = self
            .engine
            .devices()
            .iter()
            .map(|name| {
                serve::status::DeviceStatus::from_observed(
                    name,
                    self.engine.observed().devices.get(name),
                )
            })
            .collect();
        let datastore = self
            .kube
            .as_ref()
            .filter(|k| k.is_connected())
            .and_then(|k| k.latest())
            .map(|snap| snap.datastore_status(now));
        let synced = self.in_sync();
        self.fanout.publish(FindingsDelta {
            opened: transitions.opened,
            changed: transitions.changed,
            cleared: transitions.cleared,
            open,
            peers: Arc::new(verdicts),
            in_sync: synced,
            at: now,
            routes_checked: report.routes_checked,
            duration,
            devices,
            datastore,
            local_node: self.engine.desired().map(|d| d.local_node.clone()),
        });
        let counts = (summary.critical, summary.warning, summary.info);
        if synced && self.last_summary != Some(counts) {
            self.last_summary = Some(counts);
            let line = if summary.critical + summary.warning + summary.info == 0 {
                "in sync; healthy".to_string()
            } else {
                format!(
                    "in sync; {} critical, {} warning finding(s)",
                    summary.critical, summary.warning
                )
            };
            let sent = if self.ready {
                notify::status(&line)
            } else {
                notify::ready(&line)
            };
            if let Err(e) = sent {
                warn!(error = %e, "sd_notify failed");
            }
            if !self.ready {
                info!(status = %line, "first full sync done; ready");
            }
            self.ready = true;
        }
    }

    /// Mark the loop alive: `/healthz`, `generated_at`, systemd `WATCHDOG=1`. Rate-limited
    /// unless `force`.
    pub(super) async fn tick(&mut self, force: bool) {
        if !force && self.last_tick.is_some_and(|t| t.elapsed() < TICK_EVERY) {
            return;
        }
        self.last_tick = Some(Instant::now());
        self.status.tick().await;
        if self.ready {
            if let Err(e) = notify::watchdog() {
                debug!(error = %e, "sd_notify WATCHDOG failed");
            }
        }
    }
}

fn log_opened(f: &Finding) {
    warn!(
        check = %f.check,
        severity = %f.severity,
        device = %f.device,
        peer = f.peer_node.as_deref().unwrap_or("-"),
        route = f.route.as_deref().unwrap_or("-"),
        gateway = %f.gateway.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
        expected_gateway = %f.expected_gateway.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
        hint = f.hint.as_deref().unwrap_or("-"),
        "finding opened: {}",
        f.message
    );
}

fn log_cleared(f: &Finding) {
    let open_for = f
        .since
        .and_then(|s| SystemTime::now().duration_since(s).ok())
        .map(|d| {
            humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
        })
        .unwrap_or_default();
    info!(
        check = %f.check,
        severity = %f.severity,
        device = %f.device,
        peer = f.peer_node.as_deref().unwrap_or("-"),
        route = f.route.as_deref().unwrap_or("-"),
        open_for = %open_for,
        "finding cleared"
    );
}
