//! Sizes (`memory`, storage `size`): `512M`, `1.5G`, `10GiB`, or plain numbers.

/// Parses a size string to bytes: `<number>[.<fraction>][K|M|G|T][B|iB]`
/// (letters case-insensitive, powers of 1024; no unit means bytes).
/// Fractions are rounded down to whole bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size_with_unit(s, 0)
}

/// Bytes for people, in the units [`parse_size`] reads: `512 B`, `1.5 KiB`, `20.0 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Like [`parse_size`], but a number without a unit is scaled by
/// `2^unitless_shift` (20 for `memory`, which QEMU reads as MiB).
pub(crate) fn parse_size_with_unit(s: &str, unitless_shift: u32) -> Result<u64, String> {
    let invalid = || {
        format!(
            "`{s}` is not a valid size: write a number with an optional K, M, G or T suffix, e.g. `512M` or `20G`"
        )
    };
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "`{s}` is not a valid size: sizes cannot be negative"
        ));
    }
    let number_end = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(number_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() || (number.contains('.') && frac.is_empty()) || frac.contains('.') {
        return Err(invalid());
    }
    let shift = match unit_shift(unit) {
        Some(shift) => shift,
        None if unit.is_empty() && frac.is_empty() => unitless_shift,
        None => return Err(invalid()),
    };
    let too_large = || format!("`{s}` is too large");
    let multiplier = 1u128 << shift;
    let int: u128 = int.parse().map_err(|_| too_large())?;
    // Digits beyond 1e-18 cannot matter after multiplying by at most 2^40.
    let frac = &frac[..frac.len().min(18)];
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| invalid())?
    };
    let frac_bytes = frac_value * multiplier / 10u128.pow(frac.len() as u32);
    let bytes = int
        .checked_mul(multiplier)
        .and_then(|b| b.checked_add(frac_bytes))
        .filter(|b| *b <= u128::from(u64::MAX))
        .ok_or_else(too_large)?;
    if bytes == 0 {
        return Err(format!(
            "`{s}` is not a valid size: it must be greater than zero"
        ));
    }
    Ok(bytes as u64)
}

/// `K`/`kb`/`KiB` → 10, … `T…` → 40.
fn unit_shift(unit: &str) -> Option<u32> {
    let mut chars = unit.chars();
    let shift = match chars.next()?.to_ascii_uppercase() {
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return None,
    };
    let rest = chars.as_str();
    (rest.is_empty() || rest.eq_ignore_ascii_case("b") || rest.eq_ignore_ascii_case("ib"))
        .then_some(shift)
}

/// The value of a YAML 1.2 core-schema integer (`12`, `-3`, `0x1f`, `0o17`).
pub(crate) fn int_value(text: &str) -> Option<i128> {
    if let Some(hex) = text.strip_prefix("0x") {
        i128::from_str_radix(hex, 16).ok()
    } else if let Some(oct) = text.strip_prefix("0o") {
        i128::from_str_radix(oct, 8).ok()
    } else {
        text.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_sizes() {
        let cases: &[(&str, u64)] = &[
            ("1", 1),
            ("512", 512),
            ("1K", 1024),
            ("1k", 1024),
            ("2KB", 2048),
            ("2kib", 2048),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("10G", 10 << 30),
            ("10gB", 10 << 30),
            ("1.5G", 3 << 29),
            ("0.5K", 512),
            ("1.1K", 1126),
            ("2T", 2 << 40),
            ("16777215T", 16777215 << 40),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(*bytes), "{text}");
        }
        assert_eq!(parse_size_with_unit("512", 20), Ok(512 << 20));
        assert_eq!(parse_size_with_unit("1G", 20), Ok(1 << 30));
    }

    #[test]
    fn invalid_sizes() {
        let cases = [
            ("", "not a valid size"),
            ("G", "not a valid size"),
            ("10X", "not a valid size"),
            ("10 G", "not a valid size"),
            ("10GG", "not a valid size"),
            ("1.G", "not a valid size"),
            ("1.2.3G", "not a valid size"),
            ("1.5", "not a valid size"),
            ("-1G", "negative"),
            ("0", "greater than zero"),
            ("0.0001K", "greater than zero"),
            ("16777216T", "too large"),
            ("99999999999999999999999999999999999999999", "too large"),
        ];
        for (text, message) in cases {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains(message), "{text}: {err}");
        }
        assert!(parse_size("10X").unwrap_err().contains("e.g. `512M`"));
    }

    #[test]
    fn formatted_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(20 << 30), "20.0 GiB");
        assert_eq!(format_size(3 << 40), "3.0 TiB");
    }

    #[test]
    fn ints() {
        assert_eq!(int_value("0x10"), Some(16));
        assert_eq!(int_value("0o10"), Some(8));
        assert_eq!(int_value("-3"), Some(-3));
        assert_eq!(int_value("+3"), Some(3));
    }
}
