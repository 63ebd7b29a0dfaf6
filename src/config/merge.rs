//! Merging several sources in order (later wins) while every node keeps the
//! location of the source that supplied it.
//!
//! Mappings merge recursively, lists concatenate, anything else is replaced.
//! Two top-level lists are merged by identity instead: `arguments` items by
//! their option (single-instance) or `(option, id)`, `storage` entries by
//! `name`. A later item with the identity of an item from an *earlier* source
//! replaces it in place; repeats within one source are kept, so validation
//! still reports them.

use super::argv::identity;
use super::yaml::{Node, Value};

/// Merges the top-level mappings of all sources, in order.
pub(crate) fn merge_documents(docs: Vec<Node>) -> Option<Node> {
    docs.into_iter()
        .reduce(|base, over| merge(base, over, Level::Root))
}

/// Where two values being merged sit: the document root, the value of a
/// top-level key, or deeper.
#[derive(Clone, Copy)]
enum Level<'k> {
    Root,
    Top(&'k str),
    Nested,
}

fn merge(base: Node, over: Node, level: Level) -> Node {
    match (base.value, over.value) {
        (Value::Map(mut entries), Value::Map(over_entries)) => {
            for entry in over_entries {
                let Some(existing) = entries.iter_mut().find(|e| e.key == entry.key) else {
                    entries.push(entry);
                    continue;
                };
                let child_level = match level {
                    Level::Root => Level::Top(&entry.key),
                    Level::Top(_) | Level::Nested => Level::Nested,
                };
                // The key keeps its first position but now belongs to the later source.
                let placeholder = Node::new(Value::Null, entry.key_loc.clone());
                let old = std::mem::replace(&mut existing.value, placeholder);
                existing.value = merge(old, entry.value, child_level);
                existing.key_loc = entry.key_loc;
            }
            Node::new(Value::Map(entries), base.loc)
        }
        (Value::Seq(items), Value::Seq(over_items)) => {
            let merged = match level {
                Level::Top("arguments") => merge_by_identity(items, over_items, identity),
                Level::Top("storage") => merge_by_identity(items, over_items, storage_name),
                _ => items.into_iter().chain(over_items).collect(),
            };
            Node::new(Value::Seq(merged), base.loc)
        }
        (_, value) => Node::new(value, over.loc),
    }
}

fn merge_by_identity<T: PartialEq>(
    mut items: Vec<Node>,
    over: Vec<Node>,
    id: impl Fn(&Node) -> Option<T>,
) -> Vec<Node> {
    for item in over {
        let target = id(&item).and_then(|wanted| {
            items.iter().position(|old| {
                !old.loc.same_source(&item.loc) && id(old).as_ref() == Some(&wanted)
            })
        });
        match target {
            Some(i) => items[i] = item,
            None => items.push(item),
        }
    }
    items
}

fn storage_name(item: &Node) -> Option<String> {
    let Value::Map(entries) = &item.value else {
        return None;
    };
    entries
        .iter()
        .find(|e| e.key == "name")
        .and_then(|e| e.value.scalar_text())
}
