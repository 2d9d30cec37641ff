//! Where in `cluster.toml` a key is: key paths (`dn[1].pool`) to line numbers and back.
//!
//! serde hands validation plain values, so the text is parsed a second time into a document that
//! keeps byte offsets. Errors then name the line the operator has to edit.

use std::ops::Range;

use toml_edit::{ArrayOfTables, ImDocument, InlineTable, Item, Table, Value};

pub(super) struct Locator<'a> {
    text: &'a str,
    /// `None` if the text is not TOML; errors then carry no line.
    doc: Option<ImDocument<&'a str>>,
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a Table),
    Tables(&'a ArrayOfTables),
    Inline(&'a InlineTable),
    Value(&'a Value),
}

/// One step of a key path.
enum Step<'p> {
    Key(&'p str),
    Index(usize),
}

impl<'a> Node<'a> {
    fn of_item(item: &'a Item) -> Option<Self> {
        match item {
            Item::None => None,
            Item::Table(t) => Some(Node::Table(t)),
            Item::ArrayOfTables(a) => Some(Node::Tables(a)),
            Item::Value(v) => Some(Node::of_value(v)),
        }
    }

    fn of_value(value: &'a Value) -> Self {
        match value {
            Value::InlineTable(t) => Node::Inline(t),
            v => Node::Value(v),
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Table(t) => t.span(),
            Node::Tables(a) => a.span(),
            Node::Inline(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }

    /// The child at `step`, with the span of its key where it has one.
    fn child(self, step: &Step) -> Option<(Option<Range<usize>>, Node<'a>)> {
        match (self, step) {
            (Node::Table(t), Step::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                Some((key.span(), Node::of_item(item)?))
            }
            (Node::Inline(t), Step::Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                Some((key.span(), Node::of_item(item)?))
            }
            (Node::Tables(a), Step::Index(i)) => Some((None, Node::Table(a.get(*i)?))),
            (Node::Value(Value::Array(a)), Step::Index(i)) => {
                Some((None, Node::of_value(a.get(*i)?)))
            }
            _ => None,
        }
    }

    /// Every child, named as it appears in a key path.
    fn children(self) -> Vec<(String, Option<Range<usize>>, Node<'a>)> {
        let keyed = |k: &str, key: Option<&toml_edit::Key>, item: &'a Item| {
            Node::of_item(item).map(|n| (format!(".{k}"), key.and_then(|k| k.span()), n))
        };
        match self {
            Node::Table(t) => t
                .iter()
                .filter_map(|(k, item)| keyed(k, t.key(k), item))
                .collect(),
            Node::Inline(t) => t
                .iter()
                .filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    keyed(k, Some(key), item)
                })
                .collect(),
            Node::Tables(a) => a
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("[{i}]"), None, Node::Table(t)))
                .collect(),
            Node::Value(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("[{i}]"), None, Node::of_value(v)))
                .collect(),
            Node::Value(_) => Vec::new(),
        }
    }
}

/// `dn[1].pool` as steps; `None` if it is not a key path.
fn steps(path: &str) -> Option<Vec<Step<'_>>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        out.push(Step::Key(key));
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            out.push(Step::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(out)
}

fn contains(span: &Option<Range<usize>>, offset: usize) -> bool {
    span.as_ref()
        .is_some_and(|s| s.start <= offset && (offset < s.end || s.is_empty()))
}

impl<'a> Locator<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self {
            text,
            doc: ImDocument::parse(text).ok(),
        }
    }

    /// The 1-based line of a byte offset.
    pub(super) fn line_at(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    /// The line where `path` is written, or, when it is absent, the line of the nearest table
    /// that encloses it (an omitted key is added there).
    pub(super) fn line(&self, path: &str) -> Option<usize> {
        let mut node = Node::of_item(self.doc.as_ref()?.as_item())?;
        let mut at = None;
        for step in steps(path)? {
            let Some((key, child)) = node.child(&step) else {
                break;
            };
            // A key's own line, not its table header's: `[cluster]` is a key of the root.
            at = key.or_else(|| child.span()).map(|s| s.start).or(at);
            node = child;
        }
        at.map(|offset| self.line_at(offset))
    }

    /// `dn[0].pool, line 14`, for messages that point at a second place in the file.
    pub(super) fn refer(&self, path: &str) -> String {
        match self.line(path) {
            Some(line) => format!("{path}, line {line}"),
            None => path.to_owned(),
        }
    }

    /// The key path of the innermost key, value or table at `offset` (where the TOML
    /// deserializer found a missing, unknown or mistyped key).
    pub(super) fn path_at(&self, offset: usize) -> Option<String> {
        fn find(node: Node, offset: usize, path: &mut String) -> bool {
            for (name, key, child) in node.children() {
                let len = path.len();
                path.push_str(&name);
                if find(child, offset, path)
                    || contains(&key, offset)
                    || contains(&child.span(), offset)
                {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        let mut path = String::new();
        let root = Node::of_item(self.doc.as_ref()?.as_item())?;
        find(root, offset, &mut path);
        let path = path.trim_start_matches('.');
        (!path.is_empty()).then(|| path.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# a cluster\n[cluster]\nclient_ca = \"ca.pem\"\nclient_routes = [\n  \"10.0.0.0/8\",\n  \"10.1.0.0/16\",\n]\n\n[[dn]]\nname = \"dn1\"\n\n[[dn]]\nname = \"dn2\"\nlimits = { mtu = 1500 }\n";

    #[test]
    fn paths_resolve_to_lines() {
        let l = Locator::new(TEXT);
        assert_eq!(l.line("cluster"), Some(2));
        assert_eq!(l.line("cluster.client_ca"), Some(3));
        assert_eq!(l.line("cluster.client_routes[1]"), Some(6));
        assert_eq!(l.line("dn[1]"), Some(12));
        assert_eq!(l.line("dn[1].name"), Some(13));
        assert_eq!(l.line("dn[1].limits.mtu"), Some(14));
        // Absent keys point at their table.
        assert_eq!(l.line("dn[1].pool"), Some(12));
        assert_eq!(l.line("dn[5].pool"), Some(9));
        assert_eq!(l.line("ospf.network"), None);
        assert_eq!(l.refer("dn[0].name"), "dn[0].name, line 10");
    }

    #[test]
    fn offsets_resolve_to_paths() {
        let l = Locator::new(TEXT);
        let at = |s: &str| TEXT.find(s).unwrap();
        assert_eq!(
            l.path_at(at("\"10.1.0.0/16\"")).as_deref(),
            Some("cluster.client_routes[1]")
        );
        assert_eq!(l.path_at(at("\"dn2\"")).as_deref(), Some("dn[1].name"));
        assert_eq!(l.path_at(at("1500")).as_deref(), Some("dn[1].limits.mtu"));
        assert_eq!(
            l.path_at(at("[[dn]]\nname = \"dn2\"")).as_deref(),
            Some("dn[1]")
        );
        assert_eq!(l.path_at(0), None);
    }

    #[test]
    fn text_that_is_not_toml_has_no_places() {
        let l = Locator::new("[cluster\n");
        assert_eq!(l.line("cluster"), None);
        assert_eq!(l.line_at(9), 2);
    }
}
