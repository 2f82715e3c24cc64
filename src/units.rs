//! Parsing of sizes (`4G`, `512MiB`, `4096`) and durations (`200ms`, `1h`, `90s`) for the CLI.
//!
//! Must never: accept a value it cannot represent exactly, or silently wrap on overflow.
//! Sizes are binary multiples (`K` = `KiB` = 1024), as block-device tools use them.

use std::time::Duration;

/// The forms accepted, quoted in every error.
pub const SIZE_FORMS: &str = "a byte count with an optional unit: 4096, 64K, 4M, 4G, 512MiB, 1T";
pub const DURATION_FORMS: &str = "a number with a unit: 500ms, 5s, 10m, 1h, 2d (or 0)";

/// Units of sizes, largest first, with their shift.
const SIZE_UNITS: [(&str, u32); 5] = [("T", 40), ("G", 30), ("M", 20), ("K", 10), ("", 0)];
/// Units of durations, largest first, in nanoseconds.
const DURATION_UNITS: [(&str, u64); 7] = [
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses a size. Units: none or `B`; `K`/`KB`/`KiB`; `M`…; `G`…; `T`… (all powers of 1024).
///
/// Errors do not repeat the value (clap quotes it, with the flag, before the message); they
/// say what is wrong with it and the accepted forms.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty; expected {SIZE_FORMS}"));
    }
    if t.starts_with('-') {
        return Err(format!(
            "negative sizes are not accepted; expected {SIZE_FORMS}"
        ));
    }
    let (whole, fraction, unit) = split_number(t);
    if whole.is_empty() && fraction.is_none() {
        return Err(format!("not a number; expected {SIZE_FORMS}"));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "unknown unit {:?}; expected {SIZE_FORMS}",
                unit.trim()
            ))
        }
    };
    if let Some(fraction) = fraction {
        let hint = exact_fraction(whole, fraction, 1u128 << shift)
            .map(|bytes| format!(" (write {} for {t})", format_size_exact(bytes)))
            .unwrap_or_default();
        return Err(format!(
            "fractional sizes are not accepted{hint}; expected {SIZE_FORMS}"
        ));
    }
    let n: u64 = whole
        .parse()
        .map_err(|_| format!("too large; expected {SIZE_FORMS}"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "larger than 2^64 bytes".to_string())
}

/// Parses a duration. Units: `ns`, `us`, `ms`, `s`, `m`, `h`, `d`; a bare `0` is zero.
///
/// Errors do not repeat the value (see [`parse_size`]).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.starts_with('-') {
        return Err(format!(
            "negative durations are not accepted; expected {DURATION_FORMS}"
        ));
    }
    let (whole, fraction, unit) = split_number(t);
    if whole.is_empty() && fraction.is_none() {
        return Err(format!("not a number; expected {DURATION_FORMS}"));
    }
    if unit.is_empty() {
        return Err(format!("a unit is needed; expected {DURATION_FORMS}"));
    }
    let nanos_per: u64 = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => return Err(format!("unknown unit {unit:?}; expected {DURATION_FORMS}")),
    };
    if let Some(fraction) = fraction {
        let hint = exact_fraction(whole, fraction, u128::from(nanos_per))
            .and_then(|ns| u64::try_from(ns).ok())
            .map(|ns| {
                format!(
                    " (write {} for {t})",
                    format_duration(Duration::from_nanos(ns))
                )
            })
            .unwrap_or_default();
        return Err(format!(
            "fractional durations are not accepted{hint}; expected {DURATION_FORMS}"
        ));
    }
    let n: u64 = whole
        .parse()
        .map_err(|_| format!("too long; expected {DURATION_FORMS}"))?;
    let nanos = n
        .checked_mul(nanos_per)
        .ok_or_else(|| format!("too long; expected {DURATION_FORMS}"))?;
    Ok(Duration::from_nanos(nanos))
}

/// Splits `12.5GiB` into (`12`, Some(`5`), `GiB`).
fn split_number(t: &str) -> (&str, Option<&str>, &str) {
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let w = digits(t);
    let (whole, rest) = t.split_at(w);
    match rest.strip_prefix('.') {
        Some(after) => {
            let f = digits(after);
            (whole, Some(&after[..f]), &after[f..])
        }
        None => (whole, None, rest),
    }
}

/// `whole.fraction × per` when that is a whole number (the exact value a fractional input
/// meant), else `None`.
fn exact_fraction(whole: &str, fraction: &str, per: u128) -> Option<u128> {
    if fraction.len() > 18 {
        return None;
    }
    let scale = 10u128.pow(fraction.len() as u32);
    let w: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let f: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    let scaled = w.checked_mul(scale)?.checked_add(f)?.checked_mul(per)?;
    (scaled % scale == 0).then_some(scaled / scale)
}

/// Formats a byte count in the largest unit that divides it exactly: `1536M`, `4G`, `512`.
pub fn format_size_exact(bytes: u128) -> String {
    for (unit, shift) in SIZE_UNITS {
        let per = 1u128 << shift;
        if bytes >= per && bytes % per == 0 && !unit.is_empty() {
            return format!("{}{unit}", bytes / per);
        }
    }
    bytes.to_string()
}

/// Formats a duration in the largest unit that divides it exactly: `1h`, `90s`, `1500ms`,
/// `0s`. Used for configured values (`--delay`), so they print as they are typed.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    for (unit, per) in DURATION_UNITS {
        let per = u128::from(per);
        if ns % per == 0 {
            return format!("{}{unit}", ns / per);
        }
    }
    unreachable!("every duration is a whole number of nanoseconds")
}

/// Formats a measured span of time for people, the one format every status line uses:
/// `0.250 s`, `12.000 s`, `606.2 s` (seconds with three decimals below 100 s, one above),
/// or `2h 03m 04s` past an hour.
pub fn format_elapsed(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 100.0 {
        format!("{secs:.3} s")
    } else if secs < 3600.0 {
        format!("{secs:.1} s")
    } else {
        let s = d.as_secs();
        format!("{}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
    }
}

/// Formats a byte count for humans: `4.0 GiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("4X").unwrap_err().contains("4096, 64K"));
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").unwrap_err().contains("negative"));
        assert!(parse_size("99999999999T").is_err());
        let frac = parse_size("1.5G").unwrap_err();
        assert!(
            frac.contains("fractional sizes are not accepted (write 1536M for 1.5G)"),
            "{frac}"
        );
        assert!(parse_size("0.3K")
            .unwrap_err()
            .starts_with("fractional sizes are not accepted;"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("500ms"));
        assert!(parse_duration("5minutes")
            .unwrap_err()
            .contains("unknown unit \"minutes\""));
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        let frac = parse_duration("1.5s").unwrap_err();
        assert!(frac.contains("(write 1500ms for 1.5s)"), "{frac}");
    }

    #[test]
    fn formats() {
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_elapsed(Duration::from_millis(250)), "0.250 s");
        assert_eq!(format_elapsed(Duration::from_millis(606_240)), "606.2 s");
        assert_eq!(format_elapsed(Duration::from_secs(7384)), "2h 03m 04s");
        assert_eq!(format_size_exact(1536 << 20), "1536M");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4 << 30), "4.0 GiB");
    }
}
