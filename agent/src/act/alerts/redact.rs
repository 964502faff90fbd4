//! Keeping secrets out of logs, errors and status: a sink URL is shown only as
//! `scheme://host/…` (Slack and Teams-style URLs carry their token in the path), and any
//! message that might quote a secret is scrubbed before it is stored or logged.

/// `https://hooks.slack.com/services/T0/B0/XYZ` → `https://hooks.slack.com/…`. User info,
/// path, query and fragment are never shown; the port is kept (it is not a secret and tells
/// two local receivers apart). Something that is not a URL shows as `<redacted>`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".to_string();
    };
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return "<redacted>".to_string();
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // `user:password@host`: only the host part.
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() {
        return "<redacted>".to_string();
    }
    format!("{scheme}://{host}/…")
}

/// `text` with every occurrence of each secret replaced by `<redacted>` (secrets shorter than
/// 4 bytes are ignored: they would blank out ordinary words).
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.len() >= 4 && out.contains(s) {
            out = out.replace(s, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_only_scheme_and_host() {
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T000/B000/XXXXSECRET"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(
            redact_url("http://user:pw@127.0.0.1:9093/api?token=SECRET#x"),
            "http://127.0.0.1:9093/…"
        );
        assert_eq!(
            redact_url("https://events.pagerduty.com"),
            "https://events.pagerduty.com/…"
        );
        assert_eq!(redact_url("hooks.slack.com/services/SECRET"), "<redacted>");
        assert_eq!(redact_url("https:///SECRET"), "<redacted>");
        for url in [
            "https://hooks.slack.com/services/T000/B000/XXXXSECRET",
            "http://user:SECRET@h/",
            "https://h/?SECRET",
        ] {
            assert!(!redact_url(url).contains("SECRET"), "{url}");
        }
    }

    #[test]
    fn scrub_removes_every_copy() {
        let msg = "error sending request for url (https://h/SECRETTOKEN): SECRETTOKEN rejected";
        let s = scrub(msg, &["SECRETTOKEN", "ab"]);
        assert!(!s.contains("SECRETTOKEN"), "{s}");
        assert_eq!(s.matches("<redacted>").count(), 2);
        assert_eq!(scrub("a b", &["ab"]), "a b");
    }
}
