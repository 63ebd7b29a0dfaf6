//! Wall-clock time as the API carries it: microseconds since the Unix epoch, 0 = never.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// RFC 3339 in UTC with second precision, for logs and tables (no timezone database needed).
pub fn format_us(us: u64) -> String {
    if us == 0 {
        return "never".into();
    }
    let secs = (us / 1_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The local time (the `TZ` variable, else /etc/localtime) with second precision and the
/// zone's abbreviation, for people: `2026-11-22 03:09:33 CET`. Machine output (`--json`)
/// keeps [`format_us`] (UTC).
pub fn format_local_us(us: u64) -> String {
    if us == 0 {
        return "never".into();
    }
    let secs = (us / 1_000_000) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which outlives the call; a zeroed tm is a
    // valid value of the plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return format_us(us);
    }
    let zone = if tm.tm_zone.is_null() {
        String::new()
    } else {
        // SAFETY: glibc points tm_zone at a NUL-terminated abbreviation it keeps alive.
        unsafe { std::ffi::CStr::from_ptr(tm.tm_zone) }
            .to_string_lossy()
            .into_owned()
    };
    let zone = if zone.is_empty() || zone.starts_with(['+', '-']) {
        let off = tm.tm_gmtoff;
        let sign = if off < 0 { '-' } else { '+' };
        format!(
            "{sign}{:02}{:02}",
            off.abs() / 3600,
            (off.abs() % 3600) / 60
        )
    } else {
        zone
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {zone}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Howard Hinnant's days → civil date algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A point in time for `--since`: a duration ago (`90s`, `30m`, `2h`, `7d`) or a UTC
/// date (`2026-11-22`, `2026-11-22T14:05:00Z`). Returns µs since the epoch.
pub fn parse_since(s: &str, now_us: u64) -> Result<u64, String> {
    let bad = || {
        format!(
            "cannot read time '{s}': use a duration ago (90s, 30m, 2h, 7d) or a UTC date (2026-11-22 or 2026-11-22T14:05:00Z)"
        )
    };
    let s = s.trim();
    if let Some(unit) = s.chars().last().filter(|c| c.is_ascii_alphabetic())
        && let Ok(n) = s[..s.len() - 1].parse::<u64>()
    {
        let secs = match unit {
            's' => n,
            'm' => n * 60,
            'h' => n * 3600,
            'd' => n * 86_400,
            _ => return Err(bad()),
        };
        return Ok(now_us.saturating_sub(secs * 1_000_000));
    }
    let (date, clock) = s.split_once('T').unwrap_or((s, "00:00:00Z"));
    let d: Vec<u32> = date
        .split('-')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let c: Vec<u32> = clock
        .trim_end_matches('Z')
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || c.len() != 3 || !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) {
        return Err(bad());
    }
    let days = days_from_civil(d[0] as i64, d[1], d[2]);
    let secs = days * 86_400 + (c[0] * 3600 + c[1] * 60 + c[2]) as i64;
    u64::try_from(secs)
        .map(|s| s * 1_000_000)
        .map_err(|_| bad())
}

/// "3h 12m", "45s": a compact duration for uptime columns.
pub fn format_duration_us(us: u64) -> String {
    let s = us / 1_000_000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_us(0), "never");
        assert_eq!(format_us(1_000_000), "1970-01-01T00:00:01Z");
        // 2026-11-22T02:09:33Z
        assert_eq!(format_us(1_795_313_373_000_000), "2026-11-22T02:09:33Z");
        assert_eq!(format_duration_us(3_723_000_000), "1h 2m");
        assert_eq!(format_duration_us(59_000_000), "59s");
    }

    /// Local time follows `TZ` (a POSIX rule: no time zone database needed).
    #[test]
    fn local_time_follows_tz() {
        // SAFETY: no other test reads or writes TZ.
        unsafe { std::env::set_var("TZ", "XYZ-5") };
        assert_eq!(
            format_local_us(1_795_313_373_000_000),
            "2026-11-22 07:09:33 XYZ"
        );
        assert_eq!(format_local_us(0), "never");
    }

    #[test]
    fn since_accepts_durations_and_dates() {
        let now = 1_795_313_373_000_000;
        assert_eq!(parse_since("90s", now), Ok(now - 90_000_000));
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000_000));
        assert_eq!(
            format_us(parse_since("2026-11-22T02:09:33Z", now).unwrap()),
            "2026-11-22T02:09:33Z"
        );
        assert_eq!(
            format_us(parse_since("2024-02-29", now).unwrap()),
            "2024-02-29T00:00:00Z"
        );
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("2026-13-01", now).is_err());
    }
}
