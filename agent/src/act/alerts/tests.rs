//! The alerter end to end over a fake transport and a real spool directory.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::{notification::tests::incident, *};
use crate::config::{AlertsConfig, SinkConfig};
use crate::model::Severity;

#[derive(Debug, Clone)]
struct Sent {
    url: String,
    headers: Vec<(String, String)>,
    body: serde_json::Value,
}

impl Sent {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Answers from a script (then 200), records every request.
#[derive(Clone, Default)]
struct Fake {
    script: Arc<Mutex<VecDeque<Result<HttpResponse, TransportError>>>>,
    sent: Arc<Mutex<Vec<Sent>>>,
    /// Requests to a URL containing this hang this long before the answer.
    slow: Arc<Mutex<Option<(String, Duration)>>>,
}

impl Fake {
    fn answer(&self, status: u16, retry_after: Option<&str>) {
        self.script.lock().unwrap().push_back(Ok(HttpResponse {
            status,
            retry_after: retry_after.map(str::to_string),
            body: String::new(),
        }));
    }
    fn down(&self, n: usize) {
        for _ in 0..n {
            self.script
                .lock()
                .unwrap()
                .push_back(Err(TransportError::Connect("connection refused".into())));
        }
    }
    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }
}

impl Transport for Fake {
    async fn post(&self, req: HttpRequest) -> Result<HttpResponse, TransportError> {
        let slow = self.slow.lock().unwrap().clone();
        if let Some((_, delay)) = slow.filter(|(p, _)| req.url.contains(p.as_str())) {
            tokio::time::sleep(delay).await;
        }
        let answer = self.script.lock().unwrap().pop_front();
        self.sent.lock().unwrap().push(Sent {
            url: req.url.clone(),
            headers: req.headers.clone(),
            body: serde_json::from_slice(&req.body).unwrap(),
        });
        answer.unwrap_or(Ok(HttpResponse {
            status: 200,
            retry_after: None,
            body: String::new(),
        }))
    }
}

fn sink(name: &str, kind: SinkKind, url: &str) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        kind,
        url: Some(url.into()),
        url_file: None,
        url_env: None,
        routing_key_file: None,
        routing_key_env: None,
        secret_file: None,
        secret_env: None,
        min_severity: Severity::Warning,
        timeout: Duration::from_secs(1),
    }
}

fn config(dir: &std::path::Path, sinks: Vec<SinkConfig>) -> AlertsConfig {
    AlertsConfig {
        pending_for: Duration::from_secs(2),
        spool_dir: dir.to_path_buf(),
        sinks,
        ..AlertsConfig::default()
    }
}

fn t(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(ms)
}

fn hook() -> Vec<SinkConfig> {
    vec![sink("hook", SinkKind::Webhook, "http://127.0.0.1:1/hook")]
}

#[tokio::test]
async fn a_500_is_retried_with_the_same_webhook_id_and_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut a = Alerter::open(&config(dir.path(), hook()), "k8s01", fake.clone(), None).unwrap();
    fake.answer(500, None);
    fake.answer(503, None);
    a.observe(&crate::model::shared(&[incident()]), true, t(0));
    a.step(t(0)).await;
    assert!(fake.sent().is_empty(), "sent before pending_for");
    a.step(t(2000)).await;
    assert_eq!(fake.sent().len(), 1);
    assert_eq!(a.pending(), 1);
    // Not before the backoff (at most 1 s for the first retry).
    let next = a.next_attempt().unwrap();
    assert!(next > t(2000) && next <= t(3000), "{next:?}");
    a.step(next).await;
    let next = a.next_attempt().unwrap();
    assert!(next <= t(2000) + Duration::from_secs(4), "{next:?}");
    a.step(next).await;
    let sent = fake.sent();
    assert_eq!(sent.len(), 3);
    let ids: std::collections::BTreeSet<_> = sent
        .iter()
        .map(|s| s.header("webhook-id").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "retries must keep the notification id");
    assert_eq!(a.pending(), 0);
    let st = a.status(t(10_000));
    assert_eq!((st.sent, st.failed, st.pending), (1, 0, 0));
    assert_eq!(st.sinks[0].sent, 1);
    assert!(st.sinks[0].last_success.is_some());
    assert!(st.sinks[0].last_error.as_deref().unwrap().contains("503"));
    a.step(t(60_000)).await;
    assert_eq!(fake.sent().len(), 3, "sent again after a 2xx");
}

#[tokio::test]
async fn a_400_is_permanent_counted_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut a = Alerter::open(&config(dir.path(), hook()), "k8s01", fake.clone(), None).unwrap();
    fake.script.lock().unwrap().push_back(Ok(HttpResponse {
        status: 400,
        retry_after: None,
        body: "invalid payload".into(),
    }));
    a.observe(&crate::model::shared(&[incident()]), true, t(0));
    a.step(t(2000)).await;
    for s in 1..20 {
        a.step(t(2000 + s * 60_000)).await;
    }
    assert_eq!(fake.sent().len(), 1, "a 400 was retried");
    let st = a.status(t(0));
    assert_eq!((st.sent, st.failed, st.pending), (0, 1, 0));
    assert_eq!(st.sinks[0].failed, 1);
    assert_eq!(
        st.sinks[0].last_error.as_deref(),
        Some("HTTP 400: invalid payload")
    );
    assert_eq!(st.recent[0].result, "failed");
}

#[tokio::test(start_paused = true)]
async fn a_429_retry_after_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut a = Alerter::open(&config(dir.path(), hook()), "k8s01", fake.clone(), None).unwrap();
    fake.answer(429, Some("7"));
    a.observe(&crate::model::shared(&[incident()]), true, t(0));
    a.step(t(2000)).await;
    assert_eq!(a.next_attempt(), Some(t(9000)));
    a.step(t(8999)).await;
    assert_eq!(fake.sent().len(), 1, "retried before Retry-After");
    a.step(t(9000)).await;
    assert_eq!(fake.sent().len(), 2);
    assert_eq!(a.pending(), 0);
}

// Retry-After counts from the answer, not from when the request was sent (CI saw a retry
// 1.91 s after a `Retry-After: 2` answer that took ~90 ms to arrive).
#[tokio::test(start_paused = true)]
async fn retry_after_counts_from_the_answer_of_a_slow_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    *fake.slow.lock().unwrap() = Some(("/hook".into(), Duration::from_millis(150)));
    let mut a = Alerter::open(&config(dir.path(), hook()), "k8s01", fake.clone(), None).unwrap();
    fake.answer(429, Some("2"));
    a.observe(&crate::model::shared(&[incident()]), true, t(0));
    a.step(t(2000)).await;
    assert_eq!(fake.sent().len(), 1);
    let next = a.next_attempt().unwrap();
    assert!(
        next >= t(4150),
        "retry due at {:?} after t(2000), before the answer at +150 ms plus 2 s",
        next.duration_since(t(2000)).unwrap()
    );
}

#[tokio::test]
async fn a_resolve_never_overtakes_its_trigger() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut a = Alerter::open(&config(dir.path(), hook()), "k8s01", fake.clone(), None).unwrap();
    fake.down(3);
    a.observe(&crate::model::shared(&[incident()]), true, t(0));
    a.step(t(2000)).await;
    a.observe(&crate::model::shared(&[]), true, t(2500));
    a.step(t(2500)).await;
    assert_eq!(a.pending(), 2);
    let mut now = t(2500);
    for _ in 0..10 {
        now = a.next_attempt().unwrap_or(now).max(now);
        a.step(now).await;
    }
    let statuses: Vec<_> = fake
        .sent()
        .iter()
        .map(|s| s.body["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        statuses,
        ["firing", "firing", "firing", "firing", "resolved"]
    );
    assert_eq!(a.pending(), 0);
}

#[tokio::test]
async fn restart_resumes_pending_without_repaging_and_resolves_what_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let a_f = incident();
    let mut b_f = incident();
    b_f.peer_node = Some("k8s04".into());
    {
        let mut a =
            Alerter::open(&config(dir.path(), hook()), "k8s01", fake.clone(), None).unwrap();
        fake.down(100);
        a.observe(
            &crate::model::shared(&[a_f.clone(), b_f.clone()]),
            true,
            t(0),
        );
        a.step(t(2000)).await;
        assert_eq!(a.pending(), 2);
        // "kill -9": dropped without any shutdown step.
    }
    fake.script.lock().unwrap().clear();
    let before = fake.sent().len();
    let mut a = Alerter::open(&config(dir.path(), hook()), "k8s01", fake.clone(), None).unwrap();
    assert_eq!(a.pending(), 2, "pending notifications lost on restart");
    // The restarted daemon sees a still open, b cleared while it was down.
    a.observe(
        &crate::model::shared(std::slice::from_ref(&a_f)),
        true,
        t(100_000),
    );
    a.step(t(100_000)).await;
    a.step(t(100_300)).await;
    a.step(t(200_000)).await;
    let sent: Vec<Sent> = fake.sent()[before..].to_vec();
    let got: Vec<(String, String)> = sent
        .iter()
        .map(|s| {
            (
                s.body["finding"]["peer_node"].as_str().unwrap().to_string(),
                s.body["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("k8s03".into(), "firing".into()),
            ("k8s04".into(), "firing".into()),
            ("k8s04".into(), "resolved".into()),
        ],
        "each pending delivered once, no second page, b resolved"
    );
    assert_eq!(a.pending(), 0);
}

#[tokio::test]
async fn a_full_spool_drops_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut cfg = config(dir.path(), hook());
    cfg.spool_max_entries = 2;
    cfg.pending_for = Duration::ZERO;
    let mut a = Alerter::open(&cfg, "k8s01", fake.clone(), None).unwrap();
    fake.down(1000);
    let mut open = Vec::new();
    for (i, sev) in [Severity::Warning, Severity::Critical, Severity::Critical]
        .iter()
        .enumerate()
    {
        let mut f = incident();
        f.peer_node = Some(format!("peer{i}"));
        f.severity = *sev;
        open.push(f);
    }
    a.observe(&crate::model::shared(&open), true, t(0));
    a.advance(t(0));
    let st = a.status(t(0));
    assert_eq!((st.pending, st.dropped), (2, 1));
    // The warning went first.
    fake.script.lock().unwrap().clear();
    a.pump(t(600_000)).await;
    let sent = fake.sent();
    let last: Vec<_> = sent[sent.len() - 2..]
        .iter()
        .map(|s| s.body["finding"]["severity"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(last, ["critical", "critical"]);
}

#[tokio::test]
async fn sinks_get_only_what_they_want_and_alertmanager_is_reposted() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut pd = sink("pd", SinkKind::Pagerduty, "http://127.0.0.1:1/pd");
    pd.min_severity = Severity::Critical;
    let sinks = vec![
        pd,
        sink("am", SinkKind::Alertmanager, "http://127.0.0.1:2"),
        sink("chat", SinkKind::Slack, "http://127.0.0.1:3/slack"),
    ];
    let mut a = Alerter::open(&config(dir.path(), sinks), "k8s01", fake.clone(), None).unwrap();
    let mut f = incident();
    f.severity = Severity::Warning;
    a.observe(&crate::model::shared(&[f.clone()]), true, t(0));
    a.step(t(2000)).await;
    let urls: Vec<String> = fake.sent().iter().map(|s| s.url.clone()).collect();
    assert!(
        urls.iter().all(|u| !u.ends_with("/pd")),
        "a warning paged a critical-only pager"
    );
    assert!(urls.contains(&"http://127.0.0.1:2/api/v2/alerts".to_string()));
    let n = fake.sent().len();
    // Re-posted to Alertmanager after a minute, endsAt four minutes ahead.
    a.step(t(61_000)).await;
    a.step(t(62_100)).await;
    let reposts: Vec<Sent> = fake.sent()[n..].to_vec();
    assert_eq!(reposts.len(), 1, "{reposts:?}");
    assert!(reposts[0].url.ends_with("/api/v2/alerts"));
    assert_eq!(
        reposts[0].body[0]["endsAt"],
        super::notification::rfc3339(t(62_100) + Duration::from_secs(240))
    );
    let slack_text = fake
        .sent()
        .iter()
        .find(|s| s.url.ends_with("/slack"))
        .map(|s| s.body["text"].as_str().unwrap().to_string())
        .unwrap();
    assert!(slack_text.starts_with("warning gateway-wrong-vtep"));
}

#[tokio::test]
async fn secrets_never_reach_status_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.script
        .lock()
        .unwrap()
        .push_back(Err(TransportError::Other(
            "error for https://hooks.slack.com/services/T0/B0/XXXXSECRET".into(),
        )));
    let sinks = vec![sink(
        "chat",
        SinkKind::Slack,
        "https://hooks.slack.com/services/T0/B0/XXXXSECRET",
    )];
    let mut a = Alerter::open(&config(dir.path(), sinks), "k8s01", fake.clone(), None).unwrap();
    a.observe(&crate::model::shared(&[incident()]), true, t(0));
    a.step(t(2000)).await;
    let st = a.status(t(2000));
    let json = serde_json::to_string(&st).unwrap();
    assert!(st.sinks[0].last_error.is_some());
    assert!(!json.contains("XXXXSECRET"), "{json}");
    let results = send_test(
        &config(
            dir.path(),
            vec![sink(
                "chat",
                SinkKind::Slack,
                "https://hooks.slack.com/services/T0/B0/XXXXSECRET",
            )],
        ),
        "k8s01",
        None,
        &fake,
    )
    .await;
    assert_eq!(results[0].url, "https://hooks.slack.com/…");
    assert!(!serde_json::to_string(&results)
        .unwrap()
        .contains("XXXXSECRET"));
}

#[tokio::test]
async fn alert_test_marks_and_reports_each_sink() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let sinks = vec![
        sink("hook", SinkKind::Webhook, "http://127.0.0.1:1/hook"),
        sink("am", SinkKind::Alertmanager, "http://127.0.0.1:2"),
    ];
    fake.answer(200, None);
    fake.answer(200, None);
    fake.answer(500, None);
    let results = send_test(&config(dir.path(), sinks.clone()), "k8s01", None, &fake).await;
    assert_eq!(results.len(), 2);
    assert!(results[0].ok);
    assert!(!results[1].ok);
    assert_eq!(results[1].firing, Some(500));
    let sent = fake.sent();
    assert_eq!(sent[0].body["test"], true);
    assert_eq!(sent[0].body["status"], "firing");
    assert_eq!(sent[1].body["status"], "resolved");
    assert_eq!(sent[2].body[0]["labels"]["test"], "true");
    let only = send_test(&config(dir.path(), sinks), "k8s01", Some("am"), &fake).await;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].sink, "am");
}

#[test]
fn an_unusable_spool_dir_disables_the_sinks_visibly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let cfg = config(&file.join("spool"), hook());
    let err = match Alerter::open(&cfg, "k8s01", Fake::default(), None) {
        Ok(_) => panic!("opened a spool under a file"),
        Err(e) => AlertSetupError::from(e),
    };
    let rows = disabled_sinks(&cfg, &err);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].name, "hook");
    let e = rows[0].last_error.as_deref().unwrap();
    assert!(
        e.starts_with("disabled: alert spool") && e.contains("not-a-dir"),
        "{e}"
    );
}

#[tokio::test]
async fn an_unreachable_sink_is_not_hammered_within_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let mut cfg = config(dir.path(), hook());
    cfg.pending_for = Duration::ZERO;
    let mut a = Alerter::open(&cfg, "k8s01", fake.clone(), None).unwrap();
    fake.down(100);
    let open: Vec<_> = (0..5)
        .map(|i| {
            let mut f = incident();
            f.peer_node = Some(format!("peer{i}"));
            f
        })
        .collect();
    a.observe(&crate::model::shared(&open), true, t(0));
    a.step(t(0)).await;
    assert_eq!(
        fake.sent().len(),
        1,
        "kept trying an unreachable sink in one pass"
    );
    assert_eq!(a.pending(), 5);
    fake.script.lock().unwrap().clear();
    a.step(t(1)).await;
    assert_eq!(a.pending(), 1, "the others go at the next pass");
}

#[tokio::test]
async fn a_hanging_sink_delays_neither_the_others_nor_the_pass() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    *fake.slow.lock().unwrap() = Some(("/stuck".into(), Duration::from_secs(3)));
    let sinks = vec![
        sink("stuck", SinkKind::Webhook, "http://127.0.0.1:1/stuck"),
        sink("chat", SinkKind::Slack, "http://127.0.0.1:2/chat"),
    ];
    let mut cfg = config(dir.path(), sinks);
    cfg.pending_for = Duration::ZERO;
    let mut a = Alerter::open(&cfg, "k8s01", fake.clone(), None).unwrap();
    let started = std::time::Instant::now();
    a.observe(&crate::model::shared(&[incident()]), true, t(0));
    a.step(t(0)).await;
    a.observe(&crate::model::shared(&[]), true, t(100));
    a.step(t(100)).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let chat: Vec<_> = fake
        .sent()
        .iter()
        .filter(|s| s.url.ends_with("/chat"))
        .map(|s| s.body["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        chat.len(),
        2,
        "the healthy sink waited for the stuck one: {chat:?}"
    );
    assert!(chat[1].starts_with("RESOLVED"));
    let st = a.status(t(100));
    assert_eq!(
        st.sinks[0].pending, 2,
        "the stuck sink keeps its trigger and resolve"
    );
    // Once it answers, it gets both, in order.
    *fake.slow.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..4 {
        a.step(t(200 + i)).await;
    }
    let stuck: Vec<_> = fake
        .sent()
        .iter()
        .filter(|s| s.url.ends_with("/stuck"))
        .map(|s| s.body["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stuck, ["firing", "resolved"]);
    assert_eq!(a.pending(), 0);
}
