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

/// Column widths, and the one formatter for every line of a table: the
/// header and each row go through [`Columns::line`], so they cannot drift.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    widths: Vec<usize>,
}

impl Columns {
    /// Widths fitting the header and every row (a table printed at once).
    pub(crate) fn fit(headers: &[&str], rows: &[Vec<String>]) -> Self {
        let mut widths: Vec<usize> = headers.iter().map(|h| width(h)).collect();
        for row in rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        Self { widths }
    }

    /// Widths for rows not seen yet (a stream): each column as wide as its
    /// header or its minimum, whichever is wider. A cell wider than that
    /// still pushes the rest of its own row right.
    pub(crate) fn fixed(headers: &[&str], minimums: &[usize]) -> Self {
        Self {
            widths: headers
                .iter()
                .enumerate()
                .map(|(i, h)| width(h).max(minimums.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// One line: each cell left-aligned in its column, two spaces between
    /// columns, no trailing spaces.
    pub(crate) fn line<S: AsRef<str>>(&self, cells: &[S]) -> String {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let cell = cell.as_ref();
            out.push_str(cell);
            if i + 1 < cells.len() {
                let w = self.widths.get(i).copied().unwrap_or(0);
                out.extend(std::iter::repeat_n(' ', w.saturating_sub(width(cell)) + 2));
            }
        }
        out.truncate(out.trim_end().len());
        out
    }
}

/// Display width of a cell, counted in characters.
fn width(s: &str) -> usize {
    s.chars().count()
}

/// Prints rows under headers, columns padded to their widest cell.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let columns = Columns::fit(headers, rows);
    println!("{}", columns.line(headers));
    for row in rows {
        println!("{}", columns.line(row));
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
    chrono::Utc::now()
        .checked_sub_signed(parse_duration(s)?)
        .ok_or_else(|| anyhow::anyhow!("{s:?} ago is before any time this CLI can represent"))
}

/// Parses a duration with `humantime` (`30s`, `10m`, `2h`, `1d`, `1h30m`,
/// `2days`); a bare number is seconds. Never negative; refuses a duration
/// too long to add to a date.
pub(crate) fn parse_duration(s: &str) -> anyhow::Result<chrono::Duration> {
    let s = s.trim();
    let std = match s.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|e| {
            anyhow::anyhow!(
                "invalid duration or time {s:?}: {e} (e.g. 30s, 10m, 2h, 1d or RFC 3339)"
            )
        })?,
    };
    chrono::Duration::from_std(std)
        .ok()
        // A span no date can be moved by is as good as invalid.
        .filter(|d| chrono::Utc::now().checked_add_signed(*d).is_some())
        .ok_or_else(|| anyhow::anyhow!("duration {s:?} is too long"))
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
        use chrono::Duration;
        for (text, want) in [
            ("90", Duration::seconds(90)),
            ("30s", Duration::seconds(30)),
            ("10m", Duration::minutes(10)),
            ("2h", Duration::hours(2)),
            ("1d", Duration::days(1)),
            ("30d", Duration::days(30)),
            (" 1h30m ", Duration::minutes(90)),
            ("1h 30m", Duration::minutes(90)),
            ("2days", Duration::days(2)),
            ("0", Duration::zero()),
        ] {
            assert_eq!(parse_duration(text).unwrap(), want, "{text:?}");
        }
        for bad in [
            "",
            "2x",
            "abc",
            "-5m",
            "m",
            "1.5.2h",
            "99999999999999999999",
            "9999999999999999d",
            "100000000d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn since_is_a_time_or_a_duration_ago() {
        let t = parse_since("2024-05-01T10:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2024-05-01T10:00:00+00:00");
        let before = chrono::Utc::now();
        let t = parse_since("10m").unwrap();
        let ago = before - t;
        assert!(ago >= chrono::Duration::minutes(10) - chrono::Duration::seconds(1));
        assert!(ago <= chrono::Duration::minutes(10) + chrono::Duration::seconds(1));
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("9999999999999999d").is_err());
    }

    #[test]
    fn table_columns_fit_header_and_rows() {
        let rows = vec![
            vec!["1".to_owned(), "a-long-name".to_owned(), "x".to_owned()],
            vec!["22".to_owned(), "b".to_owned(), String::new()],
        ];
        let c = Columns::fit(&["ID", "NAME", "MORE"], &rows);
        assert_eq!(c.line(&["ID", "NAME", "MORE"]), "ID  NAME         MORE");
        assert_eq!(c.line(&rows[0]), "1   a-long-name  x");
        assert_eq!(c.line(&rows[1]), "22  b");
        // Width is characters, not bytes.
        let c = Columns::fit(&["A", "B"], &[vec!["ää".to_owned(), "x".to_owned()]]);
        assert_eq!(c.line(&["A", "B"]), "A   B");
        assert_eq!(c.line(&["ää", "x"]), "ää  x");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
