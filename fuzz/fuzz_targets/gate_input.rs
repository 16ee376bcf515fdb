//! What a process inside an environment sends its egress gate: DNS
//! questions, HTTP request heads (proxy and transparent), TLS ClientHellos.
//! The gate's parsers never panic, stay within their bounds, and what they
//! extract is what is there (a server name found in a ClientHello appears
//! verbatim in the input; a request head's length never exceeds the input).
//! And whatever address a name resolves to, the destination policy never
//! admits a loopback, link-local, metadata, unspecified or multicast address
//! in any mode, nor a private one without a rule inside its range, checked
//! against std's own address classification (an oracle independent of the
//! gate's tables).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use vibebox_gate::destination::{Mode, NameGrant, Policy, canonical};
use vibebox_gate::sniff::{self, Parse};

fn never_reachable(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

fn private(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            v4.is_private() || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 20_000 {
        return;
    }
    // TLS ClientHello.
    if let Parse::Done(Some(name)) = sniff::client_hello_sni(data) {
        let needle = name.as_bytes();
        assert!(
            data.windows(needle.len().max(1)).any(|w| w == needle),
            "SNI {name:?} is not in the input"
        );
    }
    // HTTP heads.
    if let Parse::Done(head) = sniff::request_head(data) {
        assert!(head.len <= data.len() && head.len <= sniff::MAX_HEAD);
        let _ = sniff::absolute_target(&head.target);
        let _ = sniff::authority(&head.target, 443);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((host, port)) = sniff::authority(text, 80) {
            assert!(!host.is_empty() && port != 0);
        }
    }
    // DNS questions.
    if let Ok(query) = simple_dns::Packet::parse(data) {
        let _ = vibebox_gate::dns::reply(
            &query,
            &vibebox_gate::dns::Answer::Gate,
            Ipv4Addr::new(10, 0, 0, 6),
        );
    }
    // Addresses: the first 16 bytes as an IPv6 address, the first 4 as IPv4.
    let mut candidates = Vec::new();
    if data.len() >= 4 {
        candidates.push(IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3])));
    }
    if data.len() >= 16 {
        let b: [u8; 16] = data[..16].try_into().unwrap();
        candidates.push(IpAddr::V6(Ipv6Addr::from(b)));
    }
    let wide = [vibebox_gate::Rule {
        host: Some("*".into()),
        cidr: Some("0.0.0.0/0".parse().unwrap()),
        ports: vec![],
    }];
    for mode in [Mode::Internet, Mode::AllowList] {
        let policy = Policy::new(mode, &wide, &[]);
        for ip in &candidates {
            for grant in [NameGrant::ByName, NameGrant::ByAddressOnly] {
                let admitted = policy.admit_address(*ip, Some(443), grant).is_ok();
                if never_reachable(*ip) || private(*ip) {
                    assert!(!admitted, "{ip} admitted in {mode:?}");
                }
            }
        }
    }
    let none = Policy::new(Mode::None, &wide, &[]);
    for ip in &candidates {
        assert!(none.admit_literal(*ip, 80).is_err());
    }
});
