//! Outbound access: the three modes, the rules of an allow list (host
//! patterns and CIDRs, with ports), their canonical forms, the address
//! classes no rule may name, and whether one decision covers another.
//!
//! Shared by the policy document (its `[egress]` sections) and the engine
//! (a request's `spec.egress`), so both refuse the same things the same way.
//!
//! Address classes, decided by the range a CIDR rule lies **inside**:
//! - **forbidden** ([`FORBIDDEN`]: "this network", loopback, link-local
//!   (cloud metadata 169.254.169.254 included), multicast, reserved and
//!   broadcast, the unspecified address, IPv6 site-local, the EC2 IPv6
//!   metadata address): no
//!   rule may lie inside them, not even in the policy document;
//! - **IPv4 embedded in IPv6** ([`EMBEDDED_V4`]: mapped, compatible, NAT64):
//!   refused as malformed, write the IPv4 rule instead;
//! - **private** ([`PRIVATE`]: RFC 1918, RFC 6598 shared/CGNAT, IPv6
//!   unique-local): reachable only through a rule that lies inside one of
//!   them (`10.20.0.0/16`), so the rule names them explicitly;
//! - **public**: everything else.
//!
//! A rule wider than a forbidden or private range (`0.0.0.0/0`, `::/0`)
//! does not name it: enforcement subtracts forbidden and private ranges from
//! every rule that does not lie inside them, so such a rule reaches public
//! addresses only. Forbidden addresses are never reachable, whatever rule
//! contains them (`fd00::/8` is private and allowed, its metadata address
//! fd00:ec2::254 is not).
//!
//! Host patterns are wildmatch patterns over lower-case DNS names: `*`
//! matches any run of characters, dots included (`*.github.com` matches
//! `api.github.com` and `a.b.github.com`, not `github.com`), `?` one
//! character.

use std::cmp::Ordering;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// At most this many rules in one allow list.
pub const MAX_RULES: usize = 64;
/// At most this many ports in one rule.
pub const MAX_PORTS: usize = 32;
/// The longest host pattern (the longest DNS name).
pub const MAX_HOST_LEN: usize = 253;

/// How an environment may reach the network. Ordered from narrowest to
/// widest: `None < AllowList < Internet`. Written `"none"`, `"allow-list"`,
/// `"internet"` in policy and spec files.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No outbound access.
    #[default]
    None,
    /// Only the destinations of the allow list.
    AllowList,
    /// Every public destination, plus the private ranges the allow list names.
    Internet,
}

impl Mode {
    /// The spelling in policy and spec files.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::AllowList => "allow-list",
            Mode::Internet => "internet",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address range in canonical form: no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            len,
        }
    }

    const fn v6(segments: [u16; 8], len: u8) -> Self {
        let [a, b, c, d, e, f, g, h] = segments;
        Self {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            len,
        }
    }

    /// Parses `address/len` (a bare address is a single host: /32 or
    /// /128). The spelling is canonicalized; a range with host bits set is
    /// refused, naming the range it would be (the meaning is never guessed).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or range (203.0.113.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
            Some(_) => return Err(format!("{s:?}: the prefix length must be 0..={max}")),
        };
        let canonical = Self {
            addr: mask(addr, len),
            len,
        };
        if canonical.addr != addr {
            return Err(format!("{s:?} has host bits set; the range is {canonical}"));
        }
        Ok(canonical)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `other` lies inside this range (equal ranges included).
    pub fn contains(&self, other: &Cidr) -> bool {
        match (self.addr, other.addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                self.len <= other.len && mask(other.addr, self.len) == self.addr
            }
            _ => false,
        }
    }

    fn key(&self) -> (u8, u128, u8) {
        match self.addr {
            IpAddr::V4(a) => (4, u128::from(u32::from(a)), self.len),
            IpAddr::V6(a) => (6, u128::from(a), self.len),
        }
    }
}

impl Ord for Cidr {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Cidr {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// Ranges no rule may lie inside, with what they are.
pub const FORBIDDEN: &[(Cidr, &str)] = &[
    (Cidr::v4(0, 0, 0, 0, 8), "\"this network\" (0.0.0.0/8)"),
    (Cidr::v4(127, 0, 0, 0, 8), "loopback (127.0.0.0/8)"),
    (
        Cidr::v4(169, 254, 0, 0, 16),
        "link-local and cloud metadata (169.254.0.0/16)",
    ),
    (Cidr::v4(224, 0, 0, 0, 4), "multicast (224.0.0.0/4)"),
    (
        Cidr::v4(240, 0, 0, 0, 4),
        "reserved and broadcast (240.0.0.0/4)",
    ),
    (
        Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
        "the unspecified address (::)",
    ),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback (::1)"),
    (
        Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        "link-local (fe80::/10)",
    ),
    (
        Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
        "multicast (ff00::/8)",
    ),
    (
        Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        "site-local, deprecated (fec0::/10)",
    ),
    (
        Cidr::v6([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254], 128),
        "cloud metadata (fd00:ec2::254)",
    ),
];

/// IPv6 ranges that carry IPv4 addresses (a rule there would reach IPv4
/// destinations past the IPv4 checks).
pub const EMBEDDED_V4: &[(Cidr, &str)] = &[
    (
        Cidr::v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96),
        "IPv4-mapped (::ffff:0:0/96)",
    ),
    (
        Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        "IPv4-compatible (::/96)",
    ),
    (
        Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
        "NAT64 (64:ff9b::/96)",
    ),
    (
        Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        "NAT64 (64:ff9b:1::/48)",
    ),
];

/// Ranges reachable only through a rule that lies inside them.
pub const PRIVATE: &[(Cidr, &str)] = &[
    (Cidr::v4(10, 0, 0, 0, 8), "private (10.0.0.0/8)"),
    (Cidr::v4(172, 16, 0, 0, 12), "private (172.16.0.0/12)"),
    (Cidr::v4(192, 168, 0, 0, 16), "private (192.168.0.0/16)"),
    (
        Cidr::v4(100, 64, 0, 0, 10),
        "shared address space / carrier-grade NAT (100.64.0.0/10)",
    ),
    (
        Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique-local (fc00::/7)",
    ),
];

/// Which class a CIDR rule falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Inside a forbidden range (named).
    Forbidden(&'static str),
    /// Inside an IPv6 range that embeds IPv4 addresses (named).
    EmbeddedV4(&'static str),
    /// Inside this private range.
    Private(Cidr),
    /// Anything else: reaches public addresses only.
    Public,
}

/// The class of `c` (see the module docs).
pub fn classify(c: &Cidr) -> Class {
    if let Some((_, what)) = FORBIDDEN.iter().find(|(f, _)| f.contains(c)) {
        return Class::Forbidden(what);
    }
    if let Some((_, what)) = EMBEDDED_V4.iter().find(|(f, _)| f.contains(c)) {
        return Class::EmbeddedV4(what);
    }
    if let Some((p, _)) = PRIVATE.iter().find(|(p, _)| p.contains(c)) {
        return Class::Private(*p);
    }
    Class::Public
}

/// Where a rule points.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// A canonical host pattern (lower case, no trailing dot).
    Host(String),
    Cidr(Cidr),
}

/// One canonical rule: a target and its ports (sorted, unique; empty = any).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Destination {
    pub target: Target,
    pub ports: Vec<u16>,
}

impl Destination {
    /// The contract's `(host, cidr)` pair.
    pub fn host_and_cidr(&self) -> (String, String) {
        match &self.target {
            Target::Host(h) => (h.clone(), String::new()),
            Target::Cidr(c) => (String::new(), c.to_string()),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Host(h) => f.write_str(h)?,
            Target::Cidr(c) => write!(f, "{c}")?,
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            write!(f, " port {}", ports.join(","))?;
        }
        Ok(())
    }
}

/// What is wrong with a rule or an allow list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Malformed. `part` is the sub-field (`host`, `cidr`, `ports`) or "".
    Invalid { part: &'static str, message: String },
    /// Names a destination that is never allowed.
    Forbidden { message: String },
}

fn invalid(part: &'static str, message: impl Into<String>) -> Problem {
    Problem::Invalid {
        part,
        message: message.into(),
    }
}

/// Validates and canonicalizes a host pattern: lower-cased, one trailing
/// dot stripped; letters, digits, `-`, `.`, `*` and `?` only; no empty
/// label; at most 253 characters, literal labels at most 63; at least one
/// letter or digit (a pattern of wildcards alone is mode internet); not an
/// IP address (write a CIDR rule).
pub fn host_pattern(raw: &str) -> Result<String, String> {
    let lower = raw.to_ascii_lowercase();
    let host = lower.strip_suffix('.').unwrap_or(&lower);
    if host.is_empty() {
        return Err("empty host pattern".into());
    }
    if host.len() > MAX_HOST_LEN {
        return Err(format!(
            "host pattern longer than {MAX_HOST_LEN} characters"
        ));
    }
    if let Some(c) = host.chars().find(|c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '*' | '?'))
    }) {
        return Err(format!(
            "{raw:?}: {c:?} is not allowed in a host pattern (letters, digits, '-', '.', '*', '?'; \
             international names in their xn-- form)"
        ));
    }
    let labels: Vec<&str> = host.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return Err(format!("{raw:?}: empty label"));
    }
    if labels
        .iter()
        .any(|l| l.len() > 63 && !l.contains(['*', '?']))
    {
        return Err(format!("{raw:?}: a label is longer than 63 characters"));
    }
    if !host.bytes().any(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("{raw:?} matches every name; use mode \"internet\""));
    }
    let last = labels.last().copied().unwrap_or_default();
    if host.parse::<Ipv4Addr>().is_ok()
        || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "{raw:?} is an address, not a name; write a cidr rule"
        ));
    }
    Ok(host.to_owned())
}

/// Validates one rule as written (`host` and `cidr` empty when unset).
pub fn destination(host: &str, cidr: &str, ports: &[u32]) -> Result<Destination, Problem> {
    let target = match (host.is_empty(), cidr.is_empty()) {
        (false, true) => Target::Host(host_pattern(host).map_err(|m| invalid("host", m))?),
        (true, false) => {
            let c = Cidr::parse(cidr).map_err(|m| invalid("cidr", m))?;
            match classify(&c) {
                Class::Forbidden(what) => {
                    return Err(Problem::Forbidden {
                        message: format!("{c} lies inside {what}, which is never reachable"),
                    });
                }
                Class::EmbeddedV4(what) => {
                    return Err(invalid(
                        "cidr",
                        format!("{c} lies inside {what}; write the IPv4 range instead"),
                    ));
                }
                Class::Private(_) | Class::Public => Target::Cidr(c),
            }
        }
        _ => return Err(invalid("", "a rule has exactly one of host and cidr")),
    };
    if ports.len() > MAX_PORTS {
        return Err(invalid(
            "ports",
            format!("at most {MAX_PORTS} ports per rule"),
        ));
    }
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        match u16::try_from(*p) {
            Ok(p) if p != 0 => out.push(p),
            _ => return Err(invalid("ports", format!("port {p} is not in 1..=65535"))),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(Destination { target, ports: out })
}

/// Checks what a mode allows its allow list to hold (after each rule is
/// valid): `none` holds nothing; `allow-list` at least one rule;
/// `internet` only CIDRs inside a private range (public ones it reaches
/// already). Returns the index of the offending rule (None: the list).
pub fn check_mode(mode: Mode, allow: &[Destination]) -> Result<(), (Option<usize>, String)> {
    match mode {
        Mode::None if !allow.is_empty() => Err((None, "mode \"none\" takes no allow rules".into())),
        Mode::AllowList if allow.is_empty() => Err((
            None,
            "mode \"allow-list\" needs at least one rule (no access at all is mode \"none\")"
                .into(),
        )),
        Mode::Internet => {
            match allow.iter().position(|d| {
                !matches!(&d.target, Target::Cidr(c) if matches!(classify(c), Class::Private(_)))
            }) {
                Some(i) => Err((
                    Some(i),
                    "mode \"internet\" reaches every public destination already; its allow \
                     rules may only name private ranges (a cidr inside 10.0.0.0/8, \
                     172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 or fc00::/7)"
                        .into(),
                )),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Sorts and deduplicates an allow list (the canonical order: host rules by
/// pattern, then CIDRs by family, address and length; then ports).
pub fn canonical(mut allow: Vec<Destination>) -> Vec<Destination> {
    allow.sort();
    allow.dedup();
    allow
}

fn ports_within(requested: &[u16], allowed: &[u16]) -> bool {
    allowed.is_empty() || (!requested.is_empty() && requested.iter().all(|p| allowed.contains(p)))
}

/// Whether every name `requested` matches, `pattern` matches too (both
/// canonical host patterns). Sound, not complete: the requested pattern's
/// symbols are matched by the policy pattern's, a requested `*` only by a
/// policy `*`, a requested `?` by a policy `?` or `*`, a letter by itself,
/// `?` or `*`. Identical patterns, and a literal name a pattern matches,
/// are always covered.
pub fn host_covers(pattern: &str, requested: &str) -> bool {
    if pattern == requested {
        return true;
    }
    let p = pattern.as_bytes();
    let r = requested.as_bytes();
    // Greedy glob matching with one backtrack point (the last `*`), with
    // the symbol relation above. Correct for any per-symbol relation as
    // long as `*` matches every sequence.
    // `pc` is never `*` here: a policy `?` takes one requested letter or
    // `?`, a policy letter only the same letter.
    let single = |pc: u8, rc: u8| match pc {
        b'?' => rc != b'*',
        _ => pc == rc,
    };
    let (mut i, mut j) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while j < r.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && single(p[i], r[j]) {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == b'*')
}

/// Whether a policy's decision (`mode`, `allow`) covers one requested rule.
pub fn covers(mode: Mode, allow: &[Destination], requested: &Destination) -> bool {
    let by_rule = |f: &dyn Fn(&Target) -> bool| {
        allow
            .iter()
            .any(|a| f(&a.target) && ports_within(&requested.ports, &a.ports))
    };
    match (&requested.target, mode) {
        (_, Mode::None) => false,
        (Target::Host(_), Mode::Internet) => true,
        (Target::Host(h), Mode::AllowList) => {
            by_rule(&|t| matches!(t, Target::Host(p) if host_covers(p, h)))
        }
        (Target::Cidr(c), _) => match classify(c) {
            // Named only by a policy rule inside the same private range.
            Class::Private(range) => {
                by_rule(&|t| matches!(t, Target::Cidr(p) if p.contains(c) && range.contains(p)))
            }
            Class::Public => {
                mode == Mode::Internet
                    || by_rule(&|t| matches!(t, Target::Cidr(p) if p.contains(c)))
            }
            Class::Forbidden(_) | Class::EmbeddedV4(_) => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    fn dest(host: &str, cidr: &str, ports: &[u32]) -> Destination {
        destination(host, cidr, ports).unwrap()
    }

    #[test]
    fn cidrs_parse_canonically_and_refuse_host_bits() {
        for (input, canonical) in [
            ("203.0.113.0/24", "203.0.113.0/24"),
            ("203.0.113.7", "203.0.113.7/32"),
            ("10.0.0.0/08", "10.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:DB8::/32", "2001:db8::/32"),
            ("2001:0db8:0000::/48", "2001:db8::/48"),
            ("::/0", "::/0"),
            ("2001:db8::1", "2001:db8::1/128"),
        ] {
            assert_eq!(cidr(input).to_string(), canonical, "{input}");
            assert_eq!(cidr(canonical).to_string(), canonical);
        }
        let e = Cidr::parse("203.0.113.7/24").unwrap_err();
        assert!(e.contains("203.0.113.0/24"), "{e}");
        let e = Cidr::parse("2001:db8::1/32").unwrap_err();
        assert!(e.contains("2001:db8::/32"), "{e}");
        for bad in [
            "",
            "/24",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0/8",
            "010.0.0.0/8",
            "10.0.0.0/8/8",
            "example.com/24",
            " 10.0.0.0/8",
            "10.0.0.0/0008",
            "fe80::1%eth0",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn containment_is_per_family() {
        assert!(cidr("10.0.0.0/8").contains(&cidr("10.20.0.0/16")));
        assert!(cidr("10.0.0.0/8").contains(&cidr("10.0.0.0/8")));
        assert!(!cidr("10.20.0.0/16").contains(&cidr("10.0.0.0/8")));
        assert!(cidr("0.0.0.0/0").contains(&cidr("10.0.0.0/8")));
        assert!(!cidr("::/0").contains(&cidr("10.0.0.0/8")));
        assert!(!cidr("0.0.0.0/0").contains(&cidr("::/0")));
        assert!(cidr("fc00::/7").contains(&cidr("fd00:ec2::254/128")));
    }

    #[test]
    fn address_classes() {
        for forbidden in [
            "127.0.0.1",
            "127.0.0.0/8",
            "127.1.0.0/16",
            "169.254.169.254",
            "169.254.0.0/16",
            "0.0.0.0/8",
            "0.0.0.0",
            "224.0.0.0/4",
            "239.1.2.3",
            "255.255.255.255",
            "240.0.0.0/4",
            "::1",
            "::",
            "fe80::/10",
            "fe80::1",
            "ff02::1",
            "fd00:ec2::254",
            "fec0::/16",
        ] {
            assert!(
                matches!(classify(&cidr(forbidden)), Class::Forbidden(_)),
                "{forbidden}"
            );
            assert!(
                matches!(
                    destination("", forbidden, &[]),
                    Err(Problem::Forbidden { .. })
                ),
                "{forbidden}"
            );
        }
        for embedded in [
            "::ffff:127.0.0.1",
            "::ffff:0:0/96",
            "::10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(
                matches!(classify(&cidr(embedded)), Class::EmbeddedV4(_)),
                "{embedded}"
            );
            assert!(
                matches!(
                    destination("", embedded, &[]),
                    Err(Problem::Invalid { part: "cidr", .. })
                ),
                "{embedded}"
            );
        }
        for (private, range) in [
            ("10.20.0.0/16", "10.0.0.0/8"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("172.20.1.0/24", "172.16.0.0/12"),
            ("192.168.1.10", "192.168.0.0/16"),
            ("100.64.0.0/10", "100.64.0.0/10"),
            ("100.100.100.100", "100.64.0.0/10"),
            ("fd12:3456::/32", "fc00::/7"),
            ("fd00:ec2::/64", "fc00::/7"),
        ] {
            assert_eq!(
                classify(&cidr(private)),
                Class::Private(cidr(range)),
                "{private}"
            );
        }
        for public in [
            "0.0.0.0/0",
            "::/0",
            "8.0.0.0/7",
            "203.0.113.0/24",
            "198.51.100.7",
            "2001:db8::/32",
            "172.32.0.0/16",
            "100.128.0.0/16",
            "126.0.0.0/7",
            "11.0.0.0/8",
        ] {
            assert_eq!(classify(&cidr(public)), Class::Public, "{public}");
        }
    }

    #[test]
    fn host_patterns() {
        for (raw, canonical) in [
            ("*.github.com", "*.github.com"),
            ("Packages.Example.COM.", "packages.example.com"),
            ("api-?.example.com", "api-?.example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("*.s3.*.amazonaws.com", "*.s3.*.amazonaws.com"),
        ] {
            assert_eq!(host_pattern(raw).as_deref(), Ok(canonical), "{raw}");
        }
        let long_label = "a".repeat(64);
        let too_long = format!("{}.com", "a.".repeat(130));
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            ".example.com",
            "example.com..",
            "exa mple.com",
            "example.com:443",
            "ex_ample.com",
            "bücher.example",
            "*",
            "*.*",
            "?",
            "**",
            "127.0.0.1",
            "10.*.1",
            "*.1",
            "1.2.3.4.",
            "a/b",
            long_label.as_str(),
            too_long.as_str(),
            "[::1]",
        ] {
            assert!(host_pattern(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rules_validate_and_canonicalize() {
        let d = dest("API.GitHub.com", "", &[443, 80, 443]);
        assert_eq!(d.target, Target::Host("api.github.com".into()));
        assert_eq!(d.ports, [80, 443]);
        for (host, cidr, ports, part) in [
            ("a.com", "10.0.0.0/8", &[][..], ""),
            ("", "", &[], ""),
            ("a.com", "", &[0], "ports"),
            ("a.com", "", &[65536], "ports"),
            ("", "203.0.113.0/24", &[70000], "ports"),
            ("a.com", "", &(1..=33).collect::<Vec<u32>>(), "ports"),
            ("a..com", "", &[], "host"),
            ("", "10.1.2.3/8", &[], "cidr"),
        ] {
            match destination(host, cidr, ports) {
                Err(Problem::Invalid { part: p, .. }) => assert_eq!(p, part, "{host} {cidr}"),
                other => panic!("{host:?} {cidr:?} {ports:?}: {other:?}"),
            }
        }
        assert!(destination("a.com", "", &(1..=32).collect::<Vec<u32>>()).is_ok());
        let list = canonical(vec![
            dest("", "203.0.113.0/24", &[443]),
            dest("b.example.com", "", &[]),
            dest("", "2001:db8::/32", &[]),
            dest("a.example.com", "", &[443]),
            dest("", "198.51.100.0/24", &[]),
            dest("b.example.com", "", &[]),
        ]);
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "a.example.com port 443",
                "b.example.com",
                "198.51.100.0/24",
                "203.0.113.0/24 port 443",
                "2001:db8::/32",
            ]
        );
    }

    #[test]
    fn modes_constrain_their_lists() {
        let public = dest("a.com", "", &[]);
        let private = dest("", "10.20.0.0/16", &[5432]);
        assert!(check_mode(Mode::None, &[]).is_ok());
        assert_eq!(
            check_mode(Mode::None, std::slice::from_ref(&public))
                .unwrap_err()
                .0,
            None
        );
        assert!(check_mode(Mode::AllowList, &[]).is_err());
        assert!(check_mode(Mode::AllowList, &[public.clone(), private.clone()]).is_ok());
        assert!(check_mode(Mode::Internet, &[]).is_ok());
        assert!(check_mode(Mode::Internet, std::slice::from_ref(&private)).is_ok());
        assert_eq!(
            check_mode(Mode::Internet, &[private, public])
                .unwrap_err()
                .0,
            Some(1)
        );
        assert!(check_mode(Mode::Internet, &[dest("", "0.0.0.0/0", &[])]).is_err());
        assert!(Mode::None < Mode::AllowList && Mode::AllowList < Mode::Internet);
    }

    #[test]
    fn host_coverage_is_sound() {
        for (policy, requested) in [
            ("*.github.com", "api.github.com"),
            ("*.github.com", "a.b.github.com"),
            ("*.github.com", "*.github.com"),
            ("*.github.com", "*.api.github.com"),
            ("*.github.com", "api-?.github.com"),
            ("*", "x.com"),
            ("packages.example.com", "packages.example.com"),
            ("api-?.example.com", "api-1.example.com"),
            ("api-?.example.com", "api-?.example.com"),
            ("*.example.*", "a.example.com"),
            ("a*b*c.com", "axxbyyc.com"),
            ("*.com", "*a*.com"),
        ] {
            assert!(
                host_covers(policy, requested),
                "{policy} should cover {requested}"
            );
        }
        for (policy, requested) in [
            ("*.github.com", "github.com"),
            ("*.github.com", "github.com.evil.com"),
            ("*.github.com", "evilgithub.com"),
            ("*.github.com", "*"),
            ("*.github.com", "*.com"),
            ("*.github.com", "*github.com"),
            ("api-?.example.com", "api-*.example.com"),
            ("api-?.example.com", "api-12.example.com"),
            ("packages.example.com", "*.example.com"),
            ("packages.example.com", "packages.example.co?"),
            ("a.com", "b.com"),
        ] {
            assert!(
                !host_covers(policy, requested),
                "{policy} must not cover {requested}"
            );
        }
    }

    #[test]
    fn decision_coverage() {
        let github = dest("*.github.com", "", &[443]);
        let docs = dest("", "203.0.113.0/24", &[80, 443]);
        let wide = dest("", "0.0.0.0/0", &[]);
        let db = dest("", "10.20.0.0/16", &[5432]);
        let allow = [github.clone(), docs.clone(), db.clone()];
        let list = |r: Destination| covers(Mode::AllowList, &allow, &r);
        assert!(list(dest("api.github.com", "", &[443])));
        assert!(
            !list(dest("api.github.com", "", &[])),
            "any port is wider than 443"
        );
        assert!(!list(dest("api.github.com", "", &[22])));
        assert!(!list(dest("gitlab.com", "", &[443])));
        assert!(list(dest("", "203.0.113.128/25", &[443])));
        assert!(list(dest("", "203.0.113.0/24", &[80, 443])));
        assert!(!list(dest("", "203.0.112.0/23", &[443])));
        assert!(!list(dest("", "203.0.113.0/24", &[8080])));
        assert!(list(dest("", "10.20.1.0/24", &[5432])));
        assert!(!list(dest("", "10.21.0.0/16", &[5432])));
        assert!(!list(dest("", "203.0.113.1", &[])), "ports any");
        // A host rule does not cover a CIDR and the other way round.
        assert!(!covers(
            Mode::AllowList,
            &[docs],
            &dest("docs.example", "", &[80])
        ));
        assert!(!covers(
            Mode::AllowList,
            &[github],
            &dest("", "140.82.112.0/20", &[443])
        ));
        // 0.0.0.0/0 names public addresses only, never a private range.
        assert!(covers(
            Mode::AllowList,
            std::slice::from_ref(&wide),
            &dest("", "198.51.100.0/24", &[])
        ));
        assert!(!covers(
            Mode::AllowList,
            std::slice::from_ref(&wide),
            &dest("", "10.0.0.0/8", &[])
        ));
        assert!(!covers(
            Mode::AllowList,
            std::slice::from_ref(&wide),
            &dest("", "192.168.1.0/24", &[])
        ));
        // A private rule names only what lies inside it.
        assert!(!covers(
            Mode::AllowList,
            std::slice::from_ref(&db),
            &dest("", "10.0.0.0/8", &[5432])
        ));
        // Internet covers every host and public range, private only when named.
        let internet = |r: Destination| covers(Mode::Internet, std::slice::from_ref(&db), &r);
        assert!(internet(dest("anything.example", "", &[])));
        assert!(internet(dest("", "0.0.0.0/0", &[])));
        assert!(internet(dest("", "::/0", &[22])));
        assert!(internet(dest("", "10.20.3.0/24", &[5432])));
        assert!(!internet(dest("", "10.20.3.0/24", &[22])));
        assert!(!internet(dest("", "192.168.0.0/16", &[])));
        assert!(!covers(Mode::Internet, &[], &dest("", "fd00::/8", &[])));
        // None covers nothing.
        assert!(!covers(
            Mode::None,
            &allow,
            &dest("api.github.com", "", &[443])
        ));
    }
}
