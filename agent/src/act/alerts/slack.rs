//! The `slack` sink: an incoming-webhook message with a fallback `text` and Block Kit
//! `blocks` (severity, check, node, peer, routes, gateway vs expected, drops, repair, the fix
//! command in a code block). Resolves are their own message, `text` starting `RESOLVED`; tests
//! start `[TEST]`. Kept within Block Kit limits: section text ≤ 3000, a field ≤ 2000, ≤ 10
//! fields, header ≤ 150.

use serde_json::{json, Value};

use super::notification::{truncate, AlertState, Notification, Reason};

const SECTION_MAX: usize = 3000;
const FIELD_MAX: usize = 2000;
const HEADER_MAX: usize = 150;

pub fn body(n: &Notification) -> Value {
    let f = &n.finding;
    let title = match (n.test, n.status, n.reason) {
        (true, _, _) => format!("[TEST] {} {}", f.severity, f.check),
        (_, _, Reason::Repaired) => format!("REPAIRED {} on {}", f.check, n.node),
        (_, AlertState::Resolved, _) => format!("RESOLVED {} on {}", f.check, n.node),
        _ => format!(
            "{} {} on {}",
            f.severity.to_string().to_uppercase(),
            f.check,
            n.node
        ),
    };
    let field = |name: &str, value: String| json!({"type": "mrkdwn", "text": truncate(&format!("*{name}*\n{value}"), FIELD_MAX)});
    let gateway = match (f.gateway, f.expected_gateway) {
        (Some(g), Some(e)) => format!("{g} (expected {e})"),
        (Some(g), None) => g.to_string(),
        (None, Some(e)) => format!("- (expected {e})"),
        (None, None) => "-".into(),
    };
    let routes = n.routes();
    let repair = f
        .repair
        .as_ref()
        .map(|r| format!("{} {}", r.action, r.status))
        .unwrap_or_else(|| "none".into());
    let fields = vec![
        field("Severity", f.severity.to_string()),
        field("Check", format!("`{}`", f.check)),
        field("Node", n.node.clone()),
        field("Peer", f.peer_node.clone().unwrap_or_else(|| "-".into())),
        field(
            "Device",
            match f.family {
                Some(family) => format!("{} ({})", f.device, family.as_str()),
                None => f.device.clone(),
            },
        ),
        field(
            "Routes",
            if routes.is_empty() {
                "-".into()
            } else {
                routes
            },
        ),
        field("Gateway vs expected", gateway),
        field(
            "Drops so far",
            f.evidence
                .drops
                .map_or_else(|| "-".into(), |d| d.to_string()),
        ),
        field("Repair", repair),
        field("Since", super::notification::rfc3339(n.started_at)),
    ];
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": truncate(&title, HEADER_MAX)}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(&f.message, SECTION_MAX)}}),
        json!({"type": "section", "fields": fields}),
    ];
    // A resolve needs no fix.
    if let Some(fix) = n.fix_command().filter(|_| n.status == AlertState::Firing) {
        // The code fence must survive truncation.
        let fix = truncate(fix, SECTION_MAX - 20);
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("*Fix*\n```{fix}```")}}));
    }
    blocks.push(json!({"type": "context", "elements": [
        {"type": "mrkdwn", "text": truncate(&format!("dataplane-watchdog · {} · {}", n.status.as_str(), n.dedup_key), SECTION_MAX)}
    ]}));
    json!({"text": truncate(&n.summary(), SECTION_MAX), "blocks": blocks})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::alerts::notification::tests::{firing, incident};

    fn texts(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(t)) = m.get("text") {
                    out.push(t.clone());
                }
                m.values().for_each(|v| texts(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| texts(v, out)),
            _ => {}
        }
    }

    #[test]
    fn blocks_carry_what_oncall_needs() {
        let n = firing(incident());
        let b = body(&n);
        assert!(b["text"]
            .as_str()
            .unwrap()
            .starts_with("critical gateway-wrong-vtep on k8s01"));
        let mut all = Vec::new();
        texts(&b["blocks"], &mut all);
        let joined = all.join("\n");
        for want in [
            "*Severity*\ncritical",
            "*Check*\n`gateway-wrong-vtep`",
            "*Node*\nk8s01",
            "*Peer*\nk8s03",
            "*Routes*\n10.1.235.128/26",
            "*Gateway vs expected*\n10.1.235.128 (expected 10.1.235.133)",
            "*Drops so far*\n1234",
            "*Repair*\nnone",
            "```ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink```",
        ] {
            assert!(joined.contains(want), "missing {want:?} in {joined}");
        }
        let fields = b["blocks"][2]["fields"].as_array().unwrap();
        assert!(fields.len() <= 10);
    }

    #[test]
    fn resolves_and_tests_are_marked_and_limits_hold() {
        let mut n = firing(incident());
        n.status = AlertState::Resolved;
        n.reason = Reason::Resolved;
        let b = body(&n);
        assert!(b["text"].as_str().unwrap().starts_with("RESOLVED"));
        assert!(
            !b.to_string().contains("*Fix*"),
            "a resolve carries the fix: {b}"
        );
        let t = Notification::test(
            "k8s01",
            AlertState::Firing,
            std::time::SystemTime::UNIX_EPOCH,
        );
        assert!(body(&t)["text"].as_str().unwrap().starts_with("[TEST]"));
        let mut long = incident();
        long.message = "x".repeat(10_000);
        long.hint = Some("y".repeat(10_000));
        long.evidence.routes = vec!["10.0.0.0/26".into(); 2000];
        let b = body(&firing(long));
        let mut all = Vec::new();
        texts(&b, &mut all);
        assert!(all.iter().all(|t| t.chars().count() <= SECTION_MAX));
        assert!(b["blocks"][3]["text"]["text"]
            .as_str()
            .unwrap()
            .ends_with("```"));
    }
}
