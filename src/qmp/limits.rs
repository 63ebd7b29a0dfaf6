//! Size limits on QMP arguments a caller hands over (`QMP.Execute`, `DeviceAdd`): checked
//! before anything reaches QEMU, whose monitor handles one command at a time. A 20 MB
//! string kept a VM's monitor busy for over a minute, and an array of a million elements
//! made QEMU's JSON parser give up half-way and answer every leftover token separately.
//! No real QMP command comes near these limits.

use serde_json::{Map, Value};

/// The most JSON text one command's arguments may take (1 MiB).
pub const MAX_ARGUMENT_BYTES: usize = 1 << 20;
/// The deepest nesting of arrays and objects in the arguments.
pub const MAX_DEPTH: usize = 32;
/// The most JSON values (every array element, object member and scalar) in the arguments.
pub const MAX_VALUES: usize = 100_000;

/// The argument text as a caller sent it, before it is parsed.
pub fn check_text(command: &str, json: &str) -> Result<(), String> {
    if json.len() > MAX_ARGUMENT_BYTES {
        return Err(format!(
            "arguments of '{command}' are {} bytes of JSON; the limit is {MAX_ARGUMENT_BYTES} bytes (1 MiB)",
            json.len()
        ));
    }
    Ok(())
}

/// Parsed (or built) arguments: depth, number of values, and size as sent.
pub fn check_value(command: &str, arguments: &Map<String, Value>) -> Result<(), String> {
    let mut values = 0usize;
    walk(arguments.values(), 1, &mut values).map_err(|limit| match limit {
        Limit::Depth => format!(
            "arguments of '{command}' nest deeper than {MAX_DEPTH} levels of arrays and objects, the limit"
        ),
        Limit::Values => format!(
            "arguments of '{command}' hold more than {MAX_VALUES} JSON values, the limit"
        ),
    })?;
    // Bounded: the count above keeps this walk small.
    let size = serde_json::to_vec(arguments).map_or(0, |v| v.len());
    if size > MAX_ARGUMENT_BYTES {
        return Err(format!(
            "arguments of '{command}' are {size} bytes of JSON; the limit is {MAX_ARGUMENT_BYTES} bytes (1 MiB)"
        ));
    }
    Ok(())
}

enum Limit {
    Depth,
    Values,
}

fn walk<'a>(
    items: impl Iterator<Item = &'a Value>,
    depth: usize,
    values: &mut usize,
) -> Result<(), Limit> {
    if depth > MAX_DEPTH {
        return Err(Limit::Depth);
    }
    for v in items {
        *values += 1;
        if *values > MAX_VALUES {
            return Err(Limit::Values);
        }
        match v {
            Value::Array(a) => walk(a.iter(), depth + 1, values)?,
            Value::Object(o) => walk(o.values(), depth + 1, values)?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn limits_name_themselves() {
        let big = "x".repeat(MAX_ARGUMENT_BYTES + 1);
        assert!(check_text("c", &big).unwrap_err().contains("1 MiB"));
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH {
            deep = json!([deep]);
        }
        let e = check_value("c", &args(json!({ "a": deep }))).unwrap_err();
        assert!(e.contains("32 levels"), "{e}");
        let many = vec![0; MAX_VALUES + 1];
        let e = check_value("c", &args(json!({ "a": many }))).unwrap_err();
        assert!(e.contains("100000 JSON values"), "{e}");
        let long = "y".repeat(MAX_ARGUMENT_BYTES);
        assert!(
            check_value("c", &args(json!({ "a": long })))
                .unwrap_err()
                .contains("1 MiB")
        );
        let ok = json!({"device": "virtio-rng-pci", "id": "rng0", "list": [[1, 2], {"k": [3]}]});
        assert!(check_value("c", &args(ok)).is_ok());
    }
}
