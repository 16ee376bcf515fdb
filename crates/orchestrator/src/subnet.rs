//! The orchestrator's own address pool: each environment network gets a small
//! subnet (a /28 by default) carved out of a configurable range, so that far
//! more environments fit on a host than Docker's default pools allow.

use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// A malformed CIDR.
#[derive(Debug, thiserror::Error)]
#[error("invalid IPv4 CIDR {0:?}")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (a, p) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = a.trim().parse().map_err(|_| err())?;
        let prefix: u8 = p.trim().parse().map_err(|_| err())?;
        if prefix > 32 {
            return Err(err());
        }
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

impl Cidr {
    fn start(&self) -> u32 {
        u32::from(self.addr)
    }

    fn end(&self) -> u32 {
        self.start() | !mask(self.prefix)
    }

    /// Whether two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.start() <= other.end() && other.start() <= self.end()
    }

    /// The first usable address, used as the gateway.
    /// The last address before the broadcast address.
    pub fn last_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.end() - 1)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.start() + 1)
    }
}

/// Splits `pool` into subnets of `prefix` bits and picks the first one that
/// overlaps nothing in `taken`.
pub fn allocate(pool: Cidr, prefix: u8, taken: &[Cidr]) -> Option<Cidr> {
    if prefix < pool.prefix || prefix > 30 {
        return None;
    }
    let size: u64 = 1u64 << (32 - prefix);
    let mut at = u64::from(pool.start());
    let end = u64::from(pool.end());
    while at + size - 1 <= end {
        let candidate = Cidr {
            addr: Ipv4Addr::from(at as u32),
            prefix,
        };
        if !taken.iter().any(|t| t.overlaps(&candidate)) {
            return Some(candidate);
        }
        at += size;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_first_free_subnet_and_skips_overlaps() {
        let pool: Cidr = "10.213.0.0/16".parse().unwrap();
        let first = allocate(pool, 28, &[]).unwrap();
        assert_eq!(first.to_string(), "10.213.0.0/28");
        let taken = vec![first, "10.213.0.16/28".parse().unwrap()];
        assert_eq!(
            allocate(pool, 28, &taken).unwrap().to_string(),
            "10.213.0.32/28"
        );
        // A foreign /24 covering the start pushes allocation past it.
        let foreign: Vec<Cidr> = vec!["10.213.0.0/24".parse().unwrap()];
        assert_eq!(
            allocate(pool, 28, &foreign).unwrap().to_string(),
            "10.213.1.0/28"
        );
    }

    #[test]
    fn exhausted_pool_yields_none() {
        let pool: Cidr = "10.213.0.0/27".parse().unwrap();
        let taken = vec![
            "10.213.0.0/28".parse().unwrap(),
            "10.213.0.16/28".parse().unwrap(),
        ];
        assert!(allocate(pool, 28, &taken).is_none());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }
}
