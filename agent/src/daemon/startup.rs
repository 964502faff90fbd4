//! Starting the daemon: the status and metrics servers, the netlink subscription and first
//! connection, eBPF, the datastore link and the consumers, then the loop.

use super::*;

/// The agent, configured but not yet running.
pub struct Daemon {
    config: Config,
    netns: Option<PathBuf>,
    datastore: AnyDatastore,
    feed: Option<watch::Receiver<DesiredState>>,
    ebpf: Option<Box<dyn DropCounterSource>>,
}

impl Daemon {
    pub fn new(config: Config, netns: Option<PathBuf>, datastore: AnyDatastore) -> Self {
        Daemon {
            config,
            netns,
            datastore,
            feed: None,
            ebpf: None,
        }
    }

    /// A datastore that pushes changes (e.g. a Kubernetes watch): every new value replaces the
    /// desired state at once; periodic `load()` still runs on each full resync.
    pub fn with_desired_feed(mut self, feed: watch::Receiver<DesiredState>) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Use this drop counter source instead of loading eBPF (tests).
    pub fn with_drop_counters(mut self, source: Box<dyn DropCounterSource>) -> Self {
        self.ebpf = Some(source);
        self
    }

    /// Run until `shutdown` completes. Fails only when it cannot start (socket, netns, port).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        limit_malloc_arenas();
        let config = &self.config;
        let status = StatusHandle::new(Status::starting(
            &config.node_name,
            config.mode.as_str(),
            config.profile.as_str(),
            SystemTime::now(),
        ));
        let metrics = Arc::new(Metrics::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };

        // The status and metrics servers answer on a thread of their own: a large response
        // (GET /status at 5,000 peers) neither waits for nor delays the loop's evaluations.
        let api_runtime = ApiRuntime::start()?;
        let api = api_runtime.handle();
        let server = {
            let _on_api = api.enter();
            StatusServer::bind(&StatusServerOptions {
                socket: config.status.socket.clone(),
                group: config.status.group.clone(),
                ..StatusServerOptions::default()
            })?
        };
        let mut servers: Vec<JoinHandle<Result<(), ServeError>>> =
            vec![api.spawn(server.run(status.clone(), stopped()))];
        if let Some(addr) = config.metrics.listen {
            let server = api
                .spawn(MetricsServer::bind(addr))
                .await
                .map_err(|e| DaemonError::ApiThread(std::io::Error::other(e)))??;
            if let Ok(bound) = server.local_addr() {
                info!(addr = %bound, "metrics served at http://{bound}/metrics");
            }
            servers.push(api.spawn(server.run(metrics.clone(), stopped())));
        }

        let result = self.main_loop(status, metrics, shutdown).await;
        let _ = notify::stopping();
        let _ = stop_tx.send(true);
        for s in servers {
            match s.await {
                Ok(Err(e)) => warn!(error = %e, "server ended with an error"),
                Err(e) => warn!(error = %e, "server task failed"),
                Ok(Ok(())) => {}
            }
        }
        info!("stopped");
        result
    }

    async fn main_loop(
        self,
        status: StatusHandle,
        metrics: Arc<Metrics>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        let Daemon {
            config,
            netns,
            datastore,
            feed,
            ebpf,
        } = self;
        let netns = netns.as_deref();
        let monitor_options = MonitorOptions {
            recv_buffer: Some(config.netlink.receive_buffer),
            ..MonitorOptions::default()
        };
        // Subscribe before the first dump so no change falls between the two.
        let monitor = Monitor::start_off_loop(netns, &monitor_options).await?;
        let observer = NetlinkObserver::new(netns)?;
        // Loading runs the verifier over every program (hundreds of ms): on a blocking thread,
        // so the status socket, already serving, answers meanwhile.
        let ebpf = match ebpf {
            Some(e) => e,
            None => {
                let (cfg, ns) = (config.clone(), netns.map(Path::to_path_buf));
                tokio::task::spawn_blocking(move || open_ebpf(&cfg, ns.as_deref()))
                    .await
                    .unwrap_or_else(|e| {
                        error!(error = %e, "eBPF load failed; drop accounting off");
                        disabled_ebpf(format!("loading failed: {e}"), netns)
                    })
            }
        };
        let ebpf_status = ebpf.status();
        let ebpf = Arc::new(std::sync::Mutex::new(ebpf));
        status
            .update(|s| s.ebpf = EbpfSummary::from(&ebpf_status))
            .await;
        metrics
            .set_ebpf_programs_attached(ebpf_status.programs.iter().filter(|p| p.attached).count());

        let kube = match &datastore {
            AnyDatastore::Kubernetes(src) => Some(kube::KubeLink::connected((**src).clone())),
            _ if matches!(config.datastore.source, DatastoreSource::Kubernetes) => {
                status
                    .update(|s| {
                        s.datastore.source = "kubernetes".into();
                        s.datastore.error = Some("connecting to the API server".into());
                    })
                    .await;
                Some(kube::KubeLink::connect(
                    KubeSourceConfig::from_config(&config),
                    status.clone(),
                ))
            }
            _ => None,
        };
        let offline = matches!(datastore, AnyDatastore::None(_)) && kube.is_none();
        // The evaluation's consumers, each on its own thread: none can hold up detection.
        let mut fanout = Fanout::default();
        fanout.spawn(consumers::StatusConsumer {
            status: status.clone(),
        });
        fanout.spawn(consumers::MetricsConsumer {
            metrics: metrics.clone(),
        });
        if let Some(link) = &kube {
            fanout.spawn(node::NodeConsumer::new(link.sources()));
        }
        let kubelet = kube
            .as_ref()
            .filter(|_| config.kubelet.enabled)
            .map(|link| super::kubelet::spawn(config.kubelet.clone(), link.sources()));
        let repair_link = config.repair_enabled().then(|| {
            let link = crate::act::repair::RepairLink::default();
            fanout.spawn(repair::RepairConsumer::new(
                &config,
                netns.map(Path::to_path_buf),
                link.clone(),
                status.clone(),
                metrics.clone(),
                kube.as_ref().map(|k| k.sources()),
            ));
            info!(
                max_repairs_per_minute = config.repair.max_repairs_per_minute,
                min_finding_age = %humantime::format_duration(config.repair.min_finding_age),
                "repair mode: findings are repaired within the guard rails"
            );
            link
        });
        // Alerts only in alert/repair mode, and only with a sink to send to (DESIGN.md §7).
        if config.mode != crate::config::Mode::Observe && !config.alerts.sinks.is_empty() {
            match crate::act::alerts::AlertConsumer::new(
                &config.alerts,
                &config.node_name,
                status.clone(),
                metrics.clone(),
            ) {
                Ok(consumer) => fanout.spawn(consumer),
                Err(e) => {
                    error!(error = %e, "alerts off: cannot start alert delivery");
                    let sinks = crate::act::alerts::disabled_sinks(&config.alerts, &e);
                    status.update(|s| s.alerts.sinks = sinks).await;
                }
            }
        }
        let mut state = LoopState {
            fanout,
            repair: repair_link,
            engine: {
                let mut e = Engine::with_specs(config.device_specs());
                e.resolve_local_by_address(!config.node_name_configured);
                e
            },
            window: RecentDrops::new(DEFAULT_DROP_WINDOW),
            file_stamp: file_stamp(&datastore),
            config,
            netns: netns.map(Path::to_path_buf),
            monitor: Some(monitor),
            monitor_options,
            observer,
            datastore,
            offline,
            feed,
            kube,
            kubelet,
            watch_ended: None,
            ebpf,
            status,
            metrics,
            watched: BTreeSet::new(),
            pending_resync: None,
            last_resync: None,
            last_tick: None,
            last_desired_ok: None,
            neigh_failed_last: Default::default(),
            status_peer_drops: None,
            synced: false,
            started: Instant::now(),
            ready: false,
            last_summary: None,
            eval_not_before: None,
            // eBPF loading parsed the kernel's BTF (tens of MiB, now free).
            heap_dirty: true,
        };
        state.run(shutdown).await;
        Ok(())
    }
}

/// glibc gives every thread that allocates its own malloc arena, and freed memory stays in
/// it. The loop, the blocking threads and the consumer threads need two: the loop's, where
/// the long-lived model lives, and one for everything transient (measured: three consumer
/// arenas cost 8 MiB of RSS at 5,000 peers). Large blocks (a status response, a dump's
/// lists, an evaluation's maps) are mapped and unmapped on their own at a fixed threshold:
/// glibc's default raises the threshold after each such free, after which they are carved
/// from an arena and stay there.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; called before the other threads start
    // allocating, and any value is safe.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// The servers' runtime, on its own thread. Stopped without waiting when dropped: a runtime
/// must not be dropped (blocking) from inside the loop's own.
struct ApiRuntime(Option<tokio::runtime::Runtime>);

impl ApiRuntime {
    fn start() -> Result<Self, DaemonError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("api")
            .enable_all()
            .build()
            .map(|rt| ApiRuntime(Some(rt)))
            .map_err(DaemonError::ApiThread)
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for ApiRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
