//! Durations as people write them in policy and spec files: `"30m"`,
//! `"8h"`, `"1h30m"`, `"7d"`, and `"never"` (or `"0"`). Whole seconds that
//! fit the contract's `uint32` fields; zero means never.
//!
//! Strict on purpose: units `d`, `h`, `m`, `s`, each at most once and
//! largest first, no fractions, no signs. [`format`] writes the canonical
//! spelling (`5400` is `"1h30m"`, `0` is `"never"`), which [`parse`] reads
//! back to the same number.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason} (write e.g. \"30m\", \"8h\", \"1h30m\", \"7d\" or \"never\")"
)]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];

/// Parses a duration into seconds; `"never"`, `"0"` and any zero total are 0.
pub fn parse(input: &str) -> Result<u32, DurationError> {
    let err = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    if s.eq_ignore_ascii_case("never") || s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(err("empty"));
    }
    let mut total: u64 = 0;
    // Index into UNITS of the next unit allowed (units go largest first).
    let mut next_unit = 0;
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err("expected a number"));
        }
        if digits > 10 {
            return Err(err("too long"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| err("expected a number"))?;
        rest = &rest[digits..];
        let Some(unit) = rest.chars().next() else {
            return Err(err("a number needs a unit (d, h, m or s)"));
        };
        let Some(at) = UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(err("units are d, h, m and s"));
        };
        if at < next_unit {
            return Err(err("each unit at most once, largest first"));
        }
        next_unit = at + 1;
        rest = &rest[unit.len_utf8()..];
        total = total
            .checked_add(n.checked_mul(UNITS[at].1).ok_or_else(|| err("too long"))?)
            .ok_or_else(|| err("too long"))?;
    }
    u32::try_from(total).map_err(|_| err("too long (at most about 136 years)"))
}

/// The canonical spelling of `seconds` (`"never"` for 0).
pub fn format(seconds: u32) -> String {
    if seconds == 0 {
        return "never".to_owned();
    }
    let mut left = u64::from(seconds);
    let mut out = String::new();
    for (unit, size) in UNITS {
        let n = left / size;
        if n > 0 {
            out.push_str(&n.to_string());
            out.push(unit);
            left %= size;
        }
    }
    out
}

/// A duration field of the policy document: whole seconds, 0 = never,
/// written as a string ([`parse`], [`format`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seconds(pub u32);

impl Seconds {
    pub const NEVER: Seconds = Seconds(0);

    pub fn is_never(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(self.0))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30m\", \"8h\" or \"never\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse(v).map(Seconds).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// `a` is at most `b`, where 0 means never (longer than any duration).
pub fn at_most(a: u32, b: u32) -> bool {
    b == 0 || (a != 0 && a <= b)
}

/// The shorter of `a` and `b`, where 0 means never.
pub fn shorter(a: u32, b: u32) -> u32 {
    if at_most(a, b) { a } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_canonically() {
        for (text, secs, canonical) in [
            ("30m", 1800, "30m"),
            ("8h", 28_800, "8h"),
            ("1h30m", 5400, "1h30m"),
            ("1h 30m", 5400, "1h30m"),
            ("90m", 5400, "1h30m"),
            ("7d", 604_800, "7d"),
            ("1d2h3m4s", 93_784, "1d2h3m4s"),
            ("45s", 45, "45s"),
            ("0", 0, "never"),
            ("never", 0, "never"),
            ("Never", 0, "never"),
            ("0s", 0, "never"),
            (" 2h ", 7200, "2h"),
        ] {
            assert_eq!(parse(text), Ok(secs), "{text}");
            assert_eq!(format(secs), canonical, "{text}");
            assert_eq!(parse(canonical), Ok(secs), "{canonical}");
        }
        assert_eq!(format(u32::MAX), "49710d6h28m15s");
        assert_eq!(parse(&format(u32::MAX)), Ok(u32::MAX));
    }

    #[test]
    fn refuses_what_is_not_a_plain_duration() {
        for bad in [
            "",
            " ",
            "30",
            "h",
            "-1h",
            "+1h",
            "1.5h",
            "1x",
            "1 h",
            "1h1h",
            "30m1h",
            "1hour",
            "2w",
            "50000d",
            "99999999999s",
            "1h,30m",
            "nevermore",
            "١h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse("1.5h").unwrap_err().to_string();
        assert!(e.contains("\"1.5h\"") && e.contains("30m"), "{e}");
    }

    #[test]
    fn never_is_longest() {
        assert!(at_most(5, 0));
        assert!(at_most(0, 0));
        assert!(!at_most(0, 5));
        assert!(at_most(5, 5) && !at_most(6, 5));
        assert_eq!(shorter(0, 7), 7);
        assert_eq!(shorter(7, 0), 7);
        assert_eq!(shorter(0, 0), 0);
        assert_eq!(shorter(3, 7), 3);
    }

    #[test]
    fn serde_takes_strings_only() {
        #[derive(Deserialize, Serialize)]
        struct T {
            d: Seconds,
        }
        let t: T = toml::from_str("d = \"1h30m\"").unwrap();
        assert_eq!(t.d, Seconds(5400));
        assert_eq!(toml::to_string(&t).unwrap().trim(), "d = \"1h30m\"");
        assert!(toml::from_str::<T>("d = 3600").is_err());
        let e = toml::from_str::<T>("d = \"1.5h\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("invalid duration"), "{e}");
    }
}
