//! The `a{sv}` options of maqet's methods: unknown keys are refused with the known
//! ones named, and a value of the wrong D-Bus type says which type it must be.

use std::collections::HashMap;

use zbus::OwnedVariant;

use crate::config::parse_size;
use crate::error::MaqetError;

/// Refuses a key not in `known`; `call` names the method or its kind in the message.
pub fn check_keys(
    options: &HashMap<String, OwnedVariant>,
    known: &[&str],
    call: &str,
) -> Result<(), MaqetError> {
    match options.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(MaqetError::InvalidArgument(format!(
            "unknown {call} option '{key}'; known options: {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

pub fn bool_option(options: &HashMap<String, OwnedVariant>, key: &str) -> Result<bool, MaqetError> {
    match options.get(key) {
        None => Ok(false),
        Some(v) => v
            .try_clone()
            .ok()
            .and_then(|v| bool::try_from(v).ok())
            .ok_or_else(|| {
                MaqetError::InvalidArgument(format!(
                    "option '{key}' must be a boolean (D-Bus type b)"
                ))
            }),
    }
}

pub fn str_option(
    options: &HashMap<String, OwnedVariant>,
    key: &str,
) -> Result<Option<String>, MaqetError> {
    match options.get(key) {
        None => Ok(None),
        Some(v) => v
            .try_clone()
            .ok()
            .and_then(|v| String::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| {
                MaqetError::InvalidArgument(format!(
                    "option '{key}' must be a string (D-Bus type s)"
                ))
            }),
    }
}

/// `size`: bytes (t) or a size text like `10G` (s).
pub fn size_option(options: &HashMap<String, OwnedVariant>) -> Result<Option<u64>, MaqetError> {
    let Some(v) = options.get("size") else {
        return Ok(None);
    };
    if let Some(n) = v.try_clone().ok().and_then(|v| u64::try_from(v).ok()) {
        return Ok(Some(n));
    }
    match str_option(options, "size") {
        Ok(Some(text)) => parse_size(&text)
            .map(Some)
            .map_err(|e| MaqetError::InvalidArgument(format!("option 'size': {e}"))),
        _ => Err(MaqetError::InvalidArgument(
            "option 'size' must be bytes (D-Bus type t) or a size like \"10G\" (s)".into(),
        )),
    }
}
