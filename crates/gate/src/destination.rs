//! Which destinations an environment may reach: pure decisions, no I/O.
//!
//! Two questions, asked in this order for every connection:
//! 1. [`Policy::admit_name`] / [`Policy::admit_literal`]: does the mode and
//!    the rule set allow this destination as the client named it?
//! 2. [`Policy::admit_address`]: is the address the gate is about to dial
//!    reachable at all? Some classes never are (loopback, link-local and
//!    the cloud metadata addresses, unspecified, multicast, broadcast, the
//!    gate's own gateways = the engine host, the configured deny list);
//!    private, shared (RFC 6598) and unique-local addresses only through a
//!    CIDR rule that lies inside such a range ("named explicitly"); public
//!    addresses when the name or a CIDR rule admits them.
//!
//! The address check runs on the address actually dialled, after
//! resolution: a name that resolves (or later re-resolves) to a forbidden
//! address is refused (DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

/// An environment's egress mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    None,
    AllowList,
    Internet,
}

/// One allowed destination (exactly one of `host` and `cidr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<IpNet>,
    /// Empty: any port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

impl Rule {
    /// `None`: any port (a DNS question, before a port is known).
    fn port_ok(&self, port: Option<u16>) -> bool {
        port.is_none_or(|p| self.ports.is_empty() || self.ports.contains(&p))
    }
}

/// Why a destination is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The environment has no egress.
    ModeNone,
    /// No rule admits the destination (allow-list mode).
    NotAllowed,
    /// The address is of a class no environment may reach.
    Forbidden(&'static str),
    /// A private range that no CIDR rule names explicitly.
    Private(&'static str),
    /// The name resolved to nothing reachable.
    Unresolvable,
    /// The client did not say where it goes (no SNI, no Host).
    NoDestination,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ModeNone => f.write_str("egress mode is none"),
            Refusal::NotAllowed => f.write_str("no allow rule matches"),
            Refusal::Forbidden(class) => write!(f, "forbidden destination ({class})"),
            Refusal::Private(class) => {
                write!(f, "private destination ({class}) not named by a CIDR rule")
            }
            Refusal::Unresolvable => {
                f.write_str("the name resolves to no address the environment may reach")
            }
            Refusal::NoDestination => f.write_str("no destination name (TLS SNI or HTTP Host)"),
        }
    }
}

impl Refusal {
    /// A stable code for events and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::ModeNone => "mode_none",
            Refusal::NotAllowed => "not_allowed",
            Refusal::Forbidden(_) => "forbidden",
            Refusal::Private(_) => "private",
            Refusal::Unresolvable => "unresolvable",
            Refusal::NoDestination => "no_destination",
        }
    }
}

/// The unmapped form of an address (`::ffff:a.b.c.d` and NAT64
/// `64:ff9b::a.b.c.d` are IPv4 destinations).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let o = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8, p: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new(Ipv4Addr::new(a, b, c, d), p).expect("valid prefix"))
}

fn v6(addr: Ipv6Addr, p: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new(addr, p).expect("valid prefix"))
}

/// Classes no rule can open.
fn forbidden_class(ip: IpAddr) -> Option<&'static str> {
    let table: [(IpNet, &'static str); 18] = [
        (v4(0, 0, 0, 0, 8), "unspecified"),
        (v4(127, 0, 0, 0, 8), "loopback"),
        (v4(169, 254, 0, 0, 16), "link-local / cloud metadata"),
        (v4(224, 0, 0, 0, 4), "multicast"),
        (v4(240, 0, 0, 0, 4), "reserved"),
        (v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
        (v4(198, 18, 0, 0, 15), "benchmarking"),
        (v6(Ipv6Addr::UNSPECIFIED, 128), "unspecified"),
        (v6(Ipv6Addr::LOCALHOST, 128), "loopback"),
        (
            v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
            "link-local",
        ),
        (
            v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
            "multicast",
        ),
        (
            v6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), 128),
            "cloud metadata",
        ),
        // IPv4-compatible and site-local leftovers, and the IPv4-embedding
        // ranges whose IPv4 side the gate cannot judge (local-use NAT64,
        // 6to4, Teredo, SIIT).
        (v6(Ipv6Addr::UNSPECIFIED, 96), "IPv4-compatible"),
        (
            v6(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48),
            "IPv4-embedding (local NAT64)",
        ),
        (
            v6(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16),
            "IPv4-embedding (6to4)",
        ),
        (
            v6(Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32),
            "IPv4-embedding (Teredo)",
        ),
        (
            v6(Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, 0, 0), 96),
            "IPv4-embedding (SIIT)",
        ),
        (
            v6(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),
            "site-local",
        ),
    ];
    table
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, class)| *class)
}

/// Ranges reachable only through a CIDR rule inside them.
fn private_class(ip: IpAddr) -> Option<(IpNet, &'static str)> {
    let table: [(IpNet, &'static str); 5] = [
        (v4(10, 0, 0, 0, 8), "RFC 1918"),
        (v4(172, 16, 0, 0, 12), "RFC 1918"),
        (v4(192, 168, 0, 0, 16), "RFC 1918"),
        (v4(100, 64, 0, 0, 10), "RFC 6598 shared / carrier-grade NAT"),
        (
            v6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
            "unique local",
        ),
    ];
    table.into_iter().find(|(net, _)| net.contains(&ip))
}

/// Lowercase, one trailing dot removed; `None` for what is not a host name.
pub fn canonical_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(name)
}

/// One environment's decision, compiled.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    hosts: Vec<(WildMatch, Vec<u16>)>,
    cidrs: Vec<Rule>,
    deny: Vec<IpNet>,
}

impl Policy {
    /// Compiles the rules; `deny` adds ranges no rule opens.
    pub fn new(mode: Mode, rules: &[Rule], deny: &[IpNet]) -> Self {
        let hosts = rules
            .iter()
            .filter_map(|r| {
                let pattern = r
                    .host
                    .as_deref()?
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                Some((WildMatch::new(&pattern), r.ports.clone()))
            })
            .collect();
        let cidrs = rules.iter().filter(|r| r.cidr.is_some()).cloned().collect();
        Self {
            mode,
            hosts,
            cidrs,
            deny: deny.to_vec(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Adds ranges no rule opens (the gate's own gateways, found at start).
    pub fn deny_also(&mut self, nets: impl IntoIterator<Item = IpNet>) {
        self.deny.extend(nets);
    }

    /// Whether a host rule admits `name` (canonical) on `port` (`None`:
    /// any port, for DNS answers).
    fn host_rule_admits(&self, name: &str, port: Option<u16>) -> bool {
        self.hosts.iter().any(|(pattern, ports)| {
            pattern.matches(name) && port.is_none_or(|p| ports.is_empty() || ports.contains(&p))
        })
    }

    /// Whether the name may be looked up and dialled at all (before its
    /// addresses are known). `port` is `None` for DNS questions.
    pub fn admit_name(&self, name: &str, port: Option<u16>) -> Result<NameGrant, Refusal> {
        match self.mode {
            Mode::None => Err(Refusal::ModeNone),
            Mode::Internet => Ok(NameGrant::ByName),
            // Only a host rule admits a name: a name no rule names is not
            // even looked up (the lookup itself would carry data out).
            // CIDR rules admit address literals (through the proxy).
            Mode::AllowList if self.host_rule_admits(name, port) => Ok(NameGrant::ByName),
            Mode::AllowList => Err(Refusal::NotAllowed),
        }
    }

    /// Whether a connection to `ip:port` may be made: for a name admitted
    /// with `grant`, or for an address literal (`grant` = `ByAddressOnly`).
    /// `port` is `None` for a DNS answer (any port of the rules).
    pub fn admit_address(
        &self,
        ip: IpAddr,
        port: Option<u16>,
        grant: NameGrant,
    ) -> Result<(), Refusal> {
        if self.mode == Mode::None {
            return Err(Refusal::ModeNone);
        }
        let ip = canonical(ip);
        if let Some(class) = forbidden_class(ip) {
            return Err(Refusal::Forbidden(class));
        }
        if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(Refusal::Forbidden("broadcast"));
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::Forbidden("platform or engine host"));
        }
        let cidr_admits = |inside: Option<IpNet>| {
            self.cidrs.iter().any(|r| {
                let Some(net) = r.cidr else { return false };
                net.contains(&ip)
                    && r.port_ok(port)
                    && inside.is_none_or(|range| range.contains(&net))
            })
        };
        if let Some((range, class)) = private_class(ip) {
            // Only a rule inside the private range names it explicitly.
            return if cidr_admits(Some(range)) {
                Ok(())
            } else {
                Err(Refusal::Private(class))
            };
        }
        match (self.mode, grant) {
            (Mode::Internet, _) => Ok(()),
            (Mode::AllowList, NameGrant::ByName) => Ok(()),
            (Mode::AllowList, NameGrant::ByAddressOnly) if cidr_admits(None) => Ok(()),
            _ => Err(Refusal::NotAllowed),
        }
    }

    /// An address literal as the client gave it.
    pub fn admit_literal(&self, ip: IpAddr, port: u16) -> Result<(), Refusal> {
        self.admit_address(ip, Some(port), NameGrant::ByAddressOnly)
    }
}

/// How a name was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameGrant {
    /// By a host rule or internet mode: any reachable address of it.
    ByName,
    /// Only addresses a CIDR rule admits.
    ByAddressOnly,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule_host(h: &str, ports: &[u16]) -> Rule {
        Rule {
            host: Some(h.into()),
            cidr: None,
            ports: ports.to_vec(),
        }
    }

    fn rule_cidr(c: &str, ports: &[u16]) -> Rule {
        Rule {
            host: None,
            cidr: Some(c.parse().unwrap()),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn none_refuses_everything() {
        let p = Policy::new(Mode::None, &[rule_host("*", &[])], &[]);
        assert_eq!(p.admit_name("example.com", None), Err(Refusal::ModeNone));
        assert_eq!(
            p.admit_literal(ip("203.0.113.5"), 80),
            Err(Refusal::ModeNone)
        );
    }

    #[test]
    fn internet_reaches_public_addresses_only() {
        let p = Policy::new(Mode::Internet, &[], &[]);
        assert_eq!(
            p.admit_name("example.com", Some(443)),
            Ok(NameGrant::ByName)
        );
        assert_eq!(p.admit_literal(ip("203.0.113.5"), 80), Ok(()));
        assert_eq!(p.admit_literal(ip("2001:db8::1"), 80), Ok(()));
        for forbidden in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
            "::127.0.0.1",
            "192.0.0.170",
            "198.18.0.1",
            "198.19.255.255",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::1",
            "2001:0:7f00:1::1",
            "::ffff:0:a00:1",
        ] {
            assert!(
                matches!(
                    p.admit_literal(ip(forbidden), 80),
                    Err(Refusal::Forbidden(_))
                ),
                "{forbidden}"
            );
        }
        for private in [
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "fc00::1",
            "fd12:3456::1",
            "::ffff:10.1.2.3",
        ] {
            assert!(
                matches!(p.admit_literal(ip(private), 80), Err(Refusal::Private(_))),
                "{private}"
            );
        }
        // Just outside the private ranges.
        assert_eq!(p.admit_literal(ip("172.32.0.1"), 80), Ok(()));
        assert_eq!(p.admit_literal(ip("100.128.0.1"), 80), Ok(()));
    }

    #[test]
    fn private_ranges_open_only_when_a_rule_names_them() {
        let wide = Policy::new(Mode::AllowList, &[rule_cidr("0.0.0.0/0", &[])], &[]);
        assert!(matches!(
            wide.admit_literal(ip("10.1.2.3"), 80),
            Err(Refusal::Private(_))
        ));
        assert_eq!(wide.admit_literal(ip("203.0.113.9"), 80), Ok(()));
        let named = Policy::new(Mode::AllowList, &[rule_cidr("10.20.0.0/16", &[5432])], &[]);
        assert_eq!(named.admit_literal(ip("10.20.1.1"), 5432), Ok(()));
        assert_eq!(
            named.admit_literal(ip("10.20.1.1"), 22),
            Err(Refusal::Private("RFC 1918"))
        );
        assert!(named.admit_literal(ip("10.21.1.1"), 5432).is_err());
        // Metadata and loopback stay closed whatever the rule says.
        let silly = Policy::new(
            Mode::AllowList,
            &[
                rule_cidr("169.254.0.0/16", &[]),
                rule_cidr("127.0.0.0/8", &[]),
            ],
            &[],
        );
        assert!(matches!(
            silly.admit_literal(ip("169.254.169.254"), 80),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            silly.admit_literal(ip("127.0.0.1"), 80),
            Err(Refusal::Forbidden(_))
        ));
    }

    #[test]
    fn allow_list_by_name_and_port() {
        let p = Policy::new(
            Mode::AllowList,
            &[
                rule_host("*.github.com", &[443]),
                rule_host("packages.example.com", &[]),
            ],
            &[],
        );
        assert_eq!(
            p.admit_name("api.github.com", Some(443)),
            Ok(NameGrant::ByName)
        );
        assert_eq!(
            p.admit_name("api.github.com", Some(80)),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(p.admit_name("api.github.com", None), Ok(NameGrant::ByName));
        assert_eq!(
            p.admit_name("github.com.evil.io", Some(443)),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            p.admit_name("packages.example.com", Some(8080)),
            Ok(NameGrant::ByName)
        );
        assert_eq!(p.admit_name("example.com", None), Err(Refusal::NotAllowed));
        // A name admitted by a host rule still cannot reach a private or
        // forbidden address (rebinding).
        assert!(matches!(
            p.admit_address(ip("10.0.0.5"), Some(443), NameGrant::ByName),
            Err(Refusal::Private(_))
        ));
        assert!(matches!(
            p.admit_address(ip("127.0.0.1"), Some(443), NameGrant::ByName),
            Err(Refusal::Forbidden(_))
        ));
        assert_eq!(
            p.admit_address(ip("203.0.113.7"), Some(443), NameGrant::ByName),
            Ok(())
        );
        // An address literal is not admitted by a host rule.
        assert_eq!(
            p.admit_literal(ip("203.0.113.7"), 443),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn cidr_rules_admit_address_literals_never_names() {
        let p = Policy::new(Mode::AllowList, &[rule_cidr("198.51.100.0/24", &[80])], &[]);
        // Not even looked up: a lookup would carry data out (DNS tunnel).
        assert_eq!(p.admit_name("svc.test", Some(80)), Err(Refusal::NotAllowed));
        assert_eq!(p.admit_name("svc.test", None), Err(Refusal::NotAllowed));
        assert_eq!(p.admit_literal(ip("198.51.100.10"), 80), Ok(()));
        assert_eq!(
            p.admit_literal(ip("198.51.100.10"), 81),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            p.admit_literal(ip("203.0.113.10"), 80),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn the_deny_list_beats_every_rule() {
        let p = Policy::new(Mode::Internet, &[], &["198.51.100.1/32".parse().unwrap()]);
        assert!(matches!(
            p.admit_literal(ip("198.51.100.1"), 80),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            p.admit_literal(ip("::ffff:198.51.100.1"), 80),
            Err(Refusal::Forbidden(_))
        ));
        assert_eq!(p.admit_literal(ip("198.51.100.2"), 80), Ok(()));
    }

    #[test]
    fn names_are_canonical_before_matching() {
        assert_eq!(
            canonical_name("API.GitHub.com."),
            Some("api.github.com".into())
        );
        assert_eq!(canonical_name("a..b"), None);
        assert_eq!(canonical_name(""), None);
        assert_eq!(canonical_name("bad name"), None);
        assert_eq!(canonical_name("x\0y"), None);
    }
}
