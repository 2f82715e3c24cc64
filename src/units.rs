//! Parsing of sizes (`4G`, `512MiB`, `4096`) and durations (`200ms`, `1h`, `90s`) for the CLI.
//!
//! Must never: accept a value it cannot represent exactly, or silently wrap on overflow.
//! Sizes are binary multiples (`K` = `KiB` = 1024), as block-device tools use them.

use std::time::Duration;

/// The forms accepted, quoted in every error.
pub const SIZE_FORMS: &str = "a byte count with an optional unit: 4096, 64K, 4M, 4G, 512MiB, 1T";
pub const DURATION_FORMS: &str = "a number with a unit: 500ms, 5s, 10m, 1h, 2d (or 0)";

/// Parses a size. Units: none or `B`; `K`/`KB`/`KiB`; `M`…; `G`…; `T`… (all powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid size {s:?}: expected {SIZE_FORMS}"));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit; expected {SIZE_FORMS}"
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: larger than 2^64 bytes"))
}

/// Parses a duration. Units: `ns`, `us`, `ms`, `s`, `m`, `h`, `d`; a bare `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || unit.is_empty() {
        return Err(format!("invalid duration {s:?}: expected {DURATION_FORMS}"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
    let nanos_per: u64 = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {unit:?}; expected {DURATION_FORMS}"
            ))
        }
    };
    let nanos = n
        .checked_mul(nanos_per)
        .ok_or_else(|| format!("invalid duration {s:?}: too long"))?;
    Ok(Duration::from_nanos(nanos))
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
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("500ms"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4 << 30), "4.0 GiB");
    }
}
