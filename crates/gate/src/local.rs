//! `gate local-addresses`: the addresses of the network namespace it runs
//! in, as a JSON array on stdout. Run by the orchestrator in a one-shot
//! container on the engine's host network, it names the engine host's own
//! addresses (public ones included), which no environment may reach.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Local IPv4 addresses from a `/proc/net/fib_trie` text: each `|-- A`
/// line followed by a `/32 host LOCAL` line.
pub fn fib_trie_locals(text: &str) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("|--") {
            last = rest.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = last
        {
            out.insert(IpAddr::V4(ip));
        }
    }
    out
}

/// IPv6 addresses from a `/proc/net/if_inet6` text.
pub fn if_inet6(text: &str) -> BTreeSet<IpAddr> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok())
        .map(|v| IpAddr::V6(Ipv6Addr::from(v)))
        .collect()
}

/// Every address of this network namespace.
pub fn addresses() -> BTreeSet<IpAddr> {
    let mut all =
        fib_trie_locals(&std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default());
    all.extend(if_inet6(
        &std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default(),
    ));
    all
}

pub(crate) fn run() -> i32 {
    let all: Vec<String> = addresses().iter().map(ToString::to_string).collect();
    match serde_json::to_string(&all) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_are_read_from_procfs_texts() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 4\n     |-- 0.0.0.0\n        /0 universe UNICAST\n           |-- 127.0.0.1\n              /32 host LOCAL\n           |-- 172.17.0.0\n              /16 link UNICAST\n           |-- 172.17.0.1\n              /32 host LOCAL\n        |-- 172.17.255.255\n           /32 link BROADCAST\n           |-- 203.0.113.7\n              /32 host LOCAL\n";
        let v4 = fib_trie_locals(trie);
        let want: BTreeSet<IpAddr> = ["127.0.0.1", "172.17.0.1", "203.0.113.7"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(v4, want);
        let v6 = if_inet6(
            "00000000000000000000000000000001 01 80 10 80       lo\nfd000000000000000000000000000002 04 40 00 82     eth0\n",
        );
        assert!(v6.contains(&"::1".parse::<IpAddr>().unwrap()));
        assert!(v6.contains(&"fd00::2".parse::<IpAddr>().unwrap()));
        // This machine's own namespace has at least loopback.
        assert!(addresses().contains(&"127.0.0.1".parse::<IpAddr>().unwrap()));
    }
}
