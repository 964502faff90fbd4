use std::net::IpAddr;

use ipnet::IpNet;
use proptest::{prelude::*, sample::select};
use serde_json::{json, Map, Value};

use super::*;

const PATH: &str = "/n";

fn pool(values: Vec<Value>) -> impl Strategy<Value = Option<Value>> {
    proptest::option::weighted(0.85, select(values))
}

fn ip_pool() -> impl Strategy<Value = Option<Value>> {
    pool(vec![
        json!("192.168.1.1"),
        json!("192.168.1.2"),
        json!("192.168.1.3"),
        json!("10.0.0.1"),
        json!("10.0.1.0"),
        json!("fd00::1"),
        json!("1.2.3"),
        json!("::1"),
        json!("0.0.0.0"),
        json!("192.168.1.1/24"),
        json!(""),
        json!(true),
        json!(17),
        json!(["10.0.0.1"]),
    ])
}

fn cidr_list(items: Vec<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        8 => proptest::collection::vec(select(items), 0..4).prop_map(|v| Some(Value::Array(v))),
        1 => Just(None),
        1 => Just(Some(json!("10.0.0.0/24"))),
    ]
}

/// One node entry: mostly plausible, with bad values, missing keys and conflicts mixed in.
fn entry() -> impl Strategy<Value = Value> {
    let name = pool(vec![
        json!("n0"),
        json!("n1"),
        json!("n2"),
        json!("n3"),
        json!(""),
        json!("a b"),
        json!(42),
        json!({"x": 1}),
    ]);
    let mac = pool(vec![
        json!("66:aa:bb:cc:dd:00"),
        json!("66:aa:bb:cc:dd:01"),
        json!("zz"),
        json!("01:00:5e:00:00:01"),
        json!(5),
    ]);
    let blocks = cidr_list(vec![
        json!("10.0.0.0/24"),
        json!("10.0.1.0/24"),
        json!("10.0.2.0/26"),
        json!("10.0.0.0/16"),
        json!("10.0.1.5/24"),
        json!("fd00:1::/64"),
        json!("junk"),
        json!("10.0.3.1"),
        json!(""),
        json!(3),
        json!(["10.0.4.0/24"]),
    ]);
    let borrowed = cidr_list(vec![
        json!("10.0.9.1/32"),
        json!("10.0.9.2"),
        json!("10.0.9.0/24"),
        json!("fd00::5/128"),
        json!("x"),
    ]);
    let extra = proptest::option::weighted(0.05, Just(json!("blue")));
    let not_a_map = proptest::option::weighted(0.03, Just(json!("oops")));
    (
        name,
        ip_pool(),
        ip_pool(),
        proptest::option::weighted(0.3, mac).prop_map(Option::flatten),
        blocks,
        proptest::option::weighted(0.4, borrowed).prop_map(Option::flatten),
        extra,
        not_a_map,
    )
        .prop_map(
            |(name, node_ip, vtep_ip, mac, blocks, borrowed, extra, not_a_map)| {
                if let Some(v) = not_a_map {
                    return v;
                }
                let mut m = Map::new();
                for (k, v) in [
                    ("name", name),
                    ("node_ip", node_ip),
                    ("vtep_ip", vtep_ip),
                    ("vtep_mac", mac),
                    ("blocks", blocks),
                    ("borrowed", borrowed),
                    ("colour", extra),
                ] {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                }
                Value::Object(m)
            },
        )
}

fn field_is_about(field: &str, prefix: &str) -> bool {
    field == prefix
        || field
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('.') || r.starts_with('['))
}

/// A generated scalar as the parser reads it (numbers as text).
fn text_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Every entry (and every block/borrowed item of a kept entry) is either in the result or
/// named by a problem.
fn check_accounted(entries: &[Value], s: &DesiredState) -> Result<(), TestCaseError> {
    for p in &s.problems {
        prop_assert!(!p.field.is_empty(), "problem without field: {p:?}");
        prop_assert!(!p.message.is_empty(), "problem without message: {p:?}");
    }
    let named = |prefix: &str| s.problems.iter().any(|p| field_is_about(&p.field, prefix));
    for (i, e) in entries.iter().enumerate() {
        let here = format!("nodes[{i}]");
        let without_vtep = e.as_object().is_some_and(|m| {
            m.get("vtep_ip").is_none()
                && text_of(m.get("name")).is_some_and(|n| s.non_vxlan.contains_key(n.trim()))
        });
        if without_vtep {
            continue; // Kept, as a node without VXLAN expectations.
        }
        // Of entries sharing a name, the node kept may be another's: one named by a problem
        // (skipped, or the duplicate) is accounted for.
        let name_of = |e: &Value| {
            e.as_object()
                .and_then(|m| text_of(m.get("name")))
                .map(|n| n.trim().to_string())
        };
        let shared_name = name_of(e).is_some_and(|n| {
            entries
                .iter()
                .filter(|o| name_of(o).as_ref() == Some(&n))
                .count()
                > 1
        });
        if shared_name && named(&here) {
            continue;
        }
        let kept = e.as_object().and_then(|m| {
            let name = text_of(m.get("name"))?;
            let node = s.nodes.get(name.trim())?;
            let ip: IpAddr = m.get("node_ip")?.as_str()?.parse().ok()?;
            let vtep: IpAddr = m.get("vtep_ip")?.as_str()?.parse().ok()?;
            (node.node_ip == ip && node.vtep_ip == vtep).then_some(node)
        });
        let Some(node) = kept else {
            prop_assert!(
                named(&here),
                "entry {i} {e} dropped silently: {:#?}",
                s.problems
            );
            continue;
        };
        for (key, got) in [("blocks", &node.blocks), ("borrowed", &node.borrowed)] {
            let Some(Value::Array(items)) = e.get(key) else {
                continue;
            };
            for (j, item) in items.iter().enumerate() {
                let text = item.as_str().unwrap_or("");
                let net = text
                    .parse::<IpNet>()
                    .ok()
                    .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from));
                if !net.is_some_and(|n| got.contains(&n)) {
                    let f = format!("{here}.{key}[{j}]");
                    prop_assert!(
                        named(&f),
                        "{f} = {item} dropped silently: {:#?}",
                        s.problems
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        let _ = parse(&text, FileFormat::Yaml, Path::new(PATH), "n0");
        let _ = parse(&text, FileFormat::Toml, Path::new(PATH), "n0");
    }

    #[test]
    fn yaml_ish_text_never_panics(
        text in "(nodes:\n)?( *- *(\\{|\\[)?(name|node_ip|vtep_ip|vtep_mac|blocks|borrowed)?: *[a-z0-9.:/\\[\\], ]{0,20}\n){0,8}"
    ) {
        let _ = parse(&text, FileFormat::Yaml, Path::new(PATH), "n0");
    }

    #[test]
    fn generated_files_account_for_every_entry(
        entries in proptest::collection::vec(entry(), 0..7),
        cut in any::<prop::sample::Index>(),
        junk in "[\\[\\]{}:,\"'= \n#a-z0-9.-]{0,4}",
    ) {
        let doc = json!({ "nodes": entries });
        let y = serde_saphyr::to_string(&doc).unwrap();
        let s = parse(&y, FileFormat::Yaml, Path::new(PATH), "n0").unwrap();
        check_accounted(&entries, &s)?;
        // TOML cannot hold every generated shape (mixed arrays); test it when it can.
        if let Ok(t) = toml::to_string(&doc) {
            let s = parse(&t, FileFormat::Toml, Path::new(PATH), "n0")
                .map_err(|e| TestCaseError::fail(format!("{e}\n{t}")))?;
            check_accounted(&entries, &s)?;
            let mut m = t.clone();
            let at = cut.index(m.len() + 1);
            if m.is_char_boundary(at) {
                m.insert_str(at, &junk);
                let _ = parse(&m, FileFormat::Toml, Path::new(PATH), "n0");
            }
        }
        // Mutated: splice junk into the middle; must not panic, whatever it gives.
        let mut m = y.clone();
        let at = cut.index(m.len() + 1);
        if m.is_char_boundary(at) {
            m.insert_str(at, &junk);
            if let Ok(s) = parse(&m, FileFormat::Yaml, Path::new(PATH), "n0") {
                for p in &s.problems {
                    prop_assert!(!p.field.is_empty());
                }
            }
        }
    }
}
