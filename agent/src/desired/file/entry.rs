//! A node entry as the file wrote it, whatever the syntax: the few shapes a node file can hold,
//! read straight from the parser's events. No document tree is built first: at 5,000 nodes a
//! YAML value tree and its event list took 22 MiB for a moment, these entries take 3.

use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A node file is four levels deep (file, `nodes`, entry, `blocks`). Deeper input is refused
/// before the parser's own recursion limit, which a small thread stack may not reach.
const MAX_DEPTH: usize = 32;

/// One value of a node file.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Item {
    /// Absent: `~`, `null`, an empty value.
    Null,
    /// A string, or a number as written text would parse (a node named `123`).
    Scalar(String),
    Bool(bool),
    List(Vec<Item>),
    /// Keys in file order, duplicates kept so that they can be reported.
    Map(Vec<(String, Item)>),
}

impl Item {
    /// What the value is, for problems ("expected a string, found a list").
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Item::Null => "nothing",
            Item::Scalar(_) => "a string",
            Item::Bool(_) => "a boolean",
            Item::List(_) => "a list",
            Item::Map(_) => "a mapping",
        }
    }

    /// A key as text. Keys that are not scalars cannot name a field: they are kept as a
    /// description so the entry is reported as having an unknown field.
    fn into_key(self) -> String {
        match self {
            Item::Scalar(s) => s,
            Item::Bool(b) => b.to_string(),
            Item::Null => "null".to_string(),
            other => format!("<{}>", other.kind()),
        }
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ItemVisitor { depth: 0 }.deserialize(deserializer)
    }
}

/// Reads one value `depth` levels below the top.
#[derive(Clone, Copy)]
struct ItemVisitor {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ItemVisitor {
    type Value = Item;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Item, D::Error> {
        if self.depth > MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "nested more than {MAX_DEPTH} levels deep; a node file needs four"
            )));
        }
        deserializer.deserialize_any(self)
    }
}

fn items<'de, A: SeqAccess<'de>>(mut seq: A, depth: usize) -> Result<Vec<Item>, A::Error> {
    let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
    while let Some(item) = seq.next_element_seed(ItemVisitor { depth: depth + 1 })? {
        items.push(item);
    }
    Ok(items)
}

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number, list or mapping")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Item, E> {
        Ok(Item::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Item, E> {
        Ok(Item::Scalar(v.to_string()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Item, E> {
        Ok(Item::Scalar(v.to_string()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Item, E> {
        Ok(Item::Scalar(v.to_string()))
    }

    fn visit_u128<E>(self, v: u128) -> Result<Item, E> {
        Ok(Item::Scalar(v.to_string()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Item, E> {
        Ok(Item::Scalar(v.to_string()))
    }

    fn visit_str<E>(self, v: &str) -> Result<Item, E> {
        Ok(Item::Scalar(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Item, E> {
        Ok(Item::Scalar(v))
    }

    fn visit_unit<E>(self) -> Result<Item, E> {
        Ok(Item::Null)
    }

    fn visit_none<E>(self) -> Result<Item, E> {
        Ok(Item::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Item, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item, A::Error> {
        items(seq, self.depth).map(Item::List)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(16));
        let below = ItemVisitor {
            depth: self.depth + 1,
        };
        while let Some((key, value)) = map.next_entry_seed(below, below)? {
            entries.push((key.into_key(), value));
        }
        Ok(Item::Map(entries))
    }
}

/// The `nodes` list. Anything else fails the file with what was found, in the parser's words
/// plus ours ("invalid type: integer `7`, expected a list of node entries under `nodes`").
#[derive(Debug)]
pub(super) struct Nodes(pub(super) Vec<Item>);

impl<'de> Deserialize<'de> for Nodes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodesVisitor;
        impl<'de> Visitor<'de> for NodesVisitor {
            type Value = Nodes;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of node entries under `nodes`")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Nodes, A::Error> {
                // Under the file's top-level mapping.
                items(seq, 1).map(Nodes)
            }
        }
        deserializer.deserialize_any(NodesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Item {
        serde_saphyr::from_str_with_options(text, super::super::yaml_options()).unwrap()
    }

    #[test]
    fn scalars_keep_their_text_and_numbers_become_text() {
        let item = yaml("{a: x, b: 123, c: 1.5, d: ~, e: true, f: yes, g: '007', h: 12:34:56}");
        let Item::Map(entries) = item else {
            panic!("{item:?}")
        };
        let want = [
            ("a", Item::Scalar("x".into())),
            ("b", Item::Scalar("123".into())),
            ("c", Item::Scalar("1.5".into())),
            ("d", Item::Null),
            ("e", Item::Bool(true)),
            // YAML 1.1 booleans and base-60 numbers stay strings.
            ("f", Item::Scalar("yes".into())),
            ("g", Item::Scalar("007".into())),
            ("h", Item::Scalar("12:34:56".into())),
        ];
        let got: Vec<(&str, &Item)> = entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let want: Vec<(&str, &Item)> = want.iter().map(|(k, v)| (*k, v)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn duplicate_and_odd_keys_are_kept_for_reporting() {
        let item = yaml("{a: 1, a: 2, [x]: 3, 4: 5}");
        let Item::Map(entries) = item else {
            panic!("{item:?}")
        };
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "a", "<a list>", "4"]);
    }
}
