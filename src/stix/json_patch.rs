//! Just enough RFC 6902 JSON Patch to undo an OpenCTI update: OpenCTI ≥ 5 puts a
//! `reverse_patch` (fast-json-patch `compare(current, previous)`) in the event context,
//! and applying it to the event's object gives the object as it was before the update.
//! `compare` only emits `add`, `remove` and `replace`; any other op, or a path that does
//! not resolve, makes [`apply`] return `None`, so the caller treats the previous state as
//! unknown instead of guessing.

use serde_json::Value;

/// Applies the operations in order to `doc`. `None` if any of them cannot be applied
/// (then `doc` may be half-patched: callers patch a scratch copy).
pub(crate) fn apply(doc: &mut Value, ops: &Value) -> Option<()> {
    for op in ops.as_array()? {
        apply_one(doc, op)?;
    }
    Some(())
}

fn apply_one(doc: &mut Value, op: &Value) -> Option<()> {
    let kind = op.get("op")?.as_str()?;
    let path = parse_pointer(op.get("path")?.as_str()?)?;
    let Some((last, parents)) = path.split_last() else {
        // The whole document: only meaningful for add/replace.
        return match kind {
            "add" | "replace" => {
                *doc = op.get("value")?.clone();
                Some(())
            }
            _ => None,
        };
    };
    let parent = resolve(doc, parents)?;
    match kind {
        "add" => add(parent, last, op.get("value")?.clone()),
        "replace" => {
            *child(parent, last)? = op.get("value")?.clone();
            Some(())
        }
        "remove" => remove(parent, last),
        _ => None,
    }
}

fn add(parent: &mut Value, token: &str, value: Value) -> Option<()> {
    match parent {
        Value::Object(map) => {
            map.insert(token.to_owned(), value);
            Some(())
        }
        Value::Array(items) if token == "-" => {
            items.push(value);
            Some(())
        }
        Value::Array(items) => {
            let index = array_index(token).filter(|i| *i <= items.len())?;
            items.insert(index, value);
            Some(())
        }
        _ => None,
    }
}

fn remove(parent: &mut Value, token: &str) -> Option<()> {
    match parent {
        Value::Object(map) => map.remove(token).map(|_| ()),
        Value::Array(items) => {
            let index = array_index(token).filter(|i| *i < items.len())?;
            items.remove(index);
            Some(())
        }
        _ => None,
    }
}

fn resolve<'v>(mut doc: &'v mut Value, tokens: &[String]) -> Option<&'v mut Value> {
    for token in tokens {
        doc = child(doc, token)?;
    }
    Some(doc)
}

fn child<'v>(parent: &'v mut Value, token: &str) -> Option<&'v mut Value> {
    match parent {
        Value::Object(map) => map.get_mut(token),
        Value::Array(items) => items.get_mut(array_index(token)?),
        _ => None,
    }
}

/// RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    let well_formed = token == "0"
        || (!token.is_empty()
            && !token.starts_with('0')
            && token.bytes().all(|b| b.is_ascii_digit()));
    if well_formed {
        token.parse().ok()
    } else {
        None
    }
}

/// RFC 6901 pointer to reference tokens (`~1` → `/`, then `~0` → `~`).
fn parse_pointer(path: &str) -> Option<Vec<String>> {
    if path.is_empty() {
        return Some(Vec::new());
    }
    let rest = path.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patched(mut doc: Value, ops: Value) -> Option<Value> {
        apply(&mut doc, &ops).map(|_| doc)
    }

    #[test]
    fn replace_add_remove_in_objects() {
        let doc = json!({"a": 1, "ext": {"x/y": {"d": true}}, "t~": 0});
        let ops = json!([
            {"op": "replace", "path": "/ext/x~1y/d", "value": false},
            {"op": "add", "path": "/b", "value": [1]},
            {"op": "remove", "path": "/a"},
            {"op": "replace", "path": "/t~0", "value": 5}
        ]);
        assert_eq!(
            patched(doc, ops),
            Some(json!({"b": [1], "ext": {"x/y": {"d": false}}, "t~": 5}))
        );
    }

    #[test]
    fn arrays() {
        let doc = json!({"l": ["a", "b", "c"]});
        let ops = json!([
            {"op": "remove", "path": "/l/2"},
            {"op": "add", "path": "/l/0", "value": "z"},
            {"op": "add", "path": "/l/-", "value": "e"},
            {"op": "replace", "path": "/l/1", "value": "y"}
        ]);
        assert_eq!(patched(doc, ops), Some(json!({"l": ["z", "y", "b", "e"]})));
    }

    #[test]
    fn unresolvable_or_unknown_ops_fail() {
        let doc = json!({"a": {"b": 1}, "l": [1]});
        for ops in [
            json!([{"op": "replace", "path": "/missing", "value": 1}]),
            json!([{"op": "remove", "path": "/a/missing"}]),
            json!([{"op": "add", "path": "/nope/x", "value": 1}]),
            json!([{"op": "move", "from": "/a", "path": "/c"}]),
            json!([{"op": "add", "path": "/l/01", "value": 1}]),
            json!([{"op": "add", "path": "/l/5", "value": 1}]),
            json!([{"op": "replace", "path": "a", "value": 1}]),
            json!([{"op": "replace", "path": "/a"}]),
            json!({"op": "replace", "path": "/a", "value": 1}),
            json!([{"op": "remove", "path": ""}]),
        ] {
            assert_eq!(patched(doc.clone(), ops.clone()), None, "{ops}");
        }
    }
}
