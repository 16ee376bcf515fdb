//! Output: aligned human tables by default, JSON (of the CLI's own view
//! structs) with `-o json`, and small formatting helpers.

use serde::Serialize;

/// The output format chosen with `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// Prints `value` as pretty JSON.
pub(crate) fn json<T: Serialize + ?Sized>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("vibebox: cannot encode JSON: {e}"),
    }
}

/// Prints rows under headers, columns padded to their widest cell.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `key: value` lines, keys aligned.
pub(crate) fn fields(pairs: &[(&str, String)]) {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in pairs {
        println!("{:<width$}  {v}", format!("{k}:"), width = width + 1);
    }
}

/// A protobuf timestamp as RFC 3339 (UTC, seconds), empty when absent.
pub(crate) fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Strips a protobuf enum prefix: `ENVIRONMENT_STATE_RUNNING` -> `running`.
pub(crate) fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

/// Human bytes (binary units).
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Parses a point in time: RFC 3339, or a duration ago (`30s`, `10m`, `2h`, `1d`).
pub(crate) fn parse_since(s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    Ok(chrono::Utc::now() - parse_duration(s)?)
}

/// Parses a duration: `30s`, `10m`, `2h`, `1d` (a bare number is seconds).
pub(crate) fn parse_duration(s: &str) -> anyhow::Result<chrono::Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| {
        anyhow::anyhow!("invalid duration or time {s:?} (e.g. 30s, 10m, 2h, 1d or RFC 3339)")
    })?;
    Ok(match unit {
        "" | "s" => chrono::Duration::seconds(n),
        "m" => chrono::Duration::minutes(n),
        "h" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        _ => anyhow::bail!("invalid duration unit in {s:?} (use s, m, h or d)"),
    })
}

/// A chrono time as a protobuf timestamp.
pub(crate) fn to_proto(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), chrono::Duration::seconds(90));
        assert_eq!(
            parse_duration("10m").unwrap(),
            chrono::Duration::minutes(10)
        );
        assert_eq!(parse_duration("2h").unwrap(), chrono::Duration::hours(2));
        assert!(parse_duration("2x").is_err());
        assert!(parse_duration("abc").is_err());
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
