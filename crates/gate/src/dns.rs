//! DNS for one environment: the server it asks (the gate's address), and
//! the stub resolver the gate itself uses upstream.
//!
//! The environment never learns a real address: an allowed name is
//! answered with the gate's own address (its transparent listeners and
//! proxy take the connection from there), a refused one with NXDOMAIN.
//! Whether a name is allowed depends on its upstream answer too: a name
//! whose every address is forbidden is refused here already (and again,
//! on the address actually dialled, when a connection comes).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Name, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};
use tokio::net::UdpSocket;

/// Upstream resolution failed.
#[derive(Debug)]
pub struct ResolveError(pub String);

/// Cached answers at most this long (and never longer than their TTL).
const MAX_CACHE_TTL: Duration = Duration::from_secs(30);
const CACHE_ENTRIES: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(2);

/// A stub resolver over UDP with a small cache.
pub struct Resolver {
    servers: Vec<SocketAddr>,
    cache: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
}

impl Resolver {
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The nameservers of /etc/resolv.conf.
    pub fn system_servers() -> Vec<SocketAddr> {
        std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }

    /// The IPv4 and IPv6 addresses of `name` (canonical), A first.
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Some((addrs, until)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            && *until > Instant::now()
        {
            return Ok(addrs.clone());
        }
        let (a, aaaa) = tokio::join!(self.query(name, TYPE::A), self.query(name, TYPE::AAAA));
        let (mut addrs, ttl_a) = a?;
        let (v6, ttl_6) = aaaa.unwrap_or((Vec::new(), 0));
        addrs.extend(v6);
        let ttl = Duration::from_secs(u64::from(ttl_a.min(ttl_6.max(1)))).min(MAX_CACHE_TTL);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(name.to_owned(), (addrs.clone(), Instant::now() + ttl));
        Ok(addrs)
    }

    async fn query(&self, name: &str, kind: TYPE) -> Result<(Vec<IpAddr>, u32), ResolveError> {
        let mut last = ResolveError("no upstream resolver".into());
        for server in &self.servers {
            for _ in 0..2 {
                match self.ask(*server, name, kind).await {
                    Ok(answer) => return Ok(answer),
                    Err(e) => last = e,
                }
            }
        }
        Err(last)
    }

    async fn ask(
        &self,
        server: SocketAddr,
        name: &str,
        kind: TYPE,
    ) -> Result<(Vec<IpAddr>, u32), ResolveError> {
        let err = |e: &dyn std::fmt::Display| ResolveError(format!("{server}: {e}"));
        let bind: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        // A fresh socket (random source port) and a random id per question.
        let socket = UdpSocket::bind(bind).await.map_err(|e| err(&e))?;
        socket.connect(server).await.map_err(|e| err(&e))?;
        let id: u16 = rand::random();
        let mut q = Packet::new_query(id);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        let qname = Name::new(name).map_err(|e| err(&e))?;
        q.questions.push(simple_dns::Question::new(
            qname,
            QTYPE::TYPE(kind),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let bytes = q.build_bytes_vec().map_err(|e| err(&e))?;
        socket.send(&bytes).await.map_err(|e| err(&e))?;
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, socket.recv(&mut buf))
                .await
                .map_err(|_| err(&"timed out"))?
                .map_err(|e| err(&e))?;
            let Ok(reply) = Packet::parse(&buf[..n]) else {
                continue;
            };
            if reply.id() != id {
                continue;
            }
            return match reply.rcode() {
                RCODE::NoError => {
                    let mut ttl = u32::MAX;
                    let addrs = reply
                        .answers
                        .iter()
                        .filter_map(|rr| {
                            let ip = match &rr.rdata {
                                RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
                                RData::AAAA(a) => IpAddr::V6(Ipv6Addr::from(a.address)),
                                _ => return None,
                            };
                            ttl = ttl.min(rr.ttl);
                            Some(ip)
                        })
                        .take(32)
                        .collect::<Vec<_>>();
                    Ok((addrs, if ttl == u32::MAX { 0 } else { ttl }))
                }
                RCODE::NameError => Ok((Vec::new(), 5)),
                other => Err(err(&format!("{other:?}"))),
            };
        }
    }
}

/// What the environment's DNS server decided for one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Answer A with the gate's address.
    Gate,
    /// An allowed name, but no record of this type (AAAA and the rest).
    NoData,
    /// NXDOMAIN (refused by policy or unresolvable).
    NoSuchName,
    /// REFUSED (egress is off).
    Refused,
}

/// Builds the reply to `query` (a parsed question packet).
pub fn reply(query: &Packet<'_>, answer: &Answer, gate: Ipv4Addr) -> Option<Vec<u8>> {
    let mut out = Packet::new_reply(query.id());
    out.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        out.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    let question = query.questions.first()?.clone();
    out.questions.push(question.clone());
    match answer {
        Answer::Gate => out.answers.push(ResourceRecord::new(
            question.qname.clone(),
            CLASS::IN,
            5,
            RData::A(A::from(gate)),
        )),
        Answer::NoData => {}
        Answer::NoSuchName => *out.rcode_mut() = RCODE::NameError,
        Answer::Refused => *out.rcode_mut() = RCODE::Refused,
    }
    out.build_bytes_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, kind: TYPE) -> Vec<u8> {
        let mut q = Packet::new_query(7);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(simple_dns::Question::new(
            Name::new(name).unwrap(),
            QTYPE::TYPE(kind),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        q.build_bytes_vec().unwrap()
    }

    #[test]
    fn allowed_names_point_at_the_gate() {
        let bytes = query("pkg.example.com", TYPE::A);
        let q = Packet::parse(&bytes).unwrap();
        let gate = Ipv4Addr::new(10, 9, 0, 6);
        let r = reply(&q, &Answer::Gate, gate).unwrap();
        let r = Packet::parse(&r).unwrap();
        assert_eq!(r.id(), 7);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].rdata, RData::A(A::from(gate)));
        let r = reply(&q, &Answer::NoSuchName, gate).unwrap();
        assert_eq!(Packet::parse(&r).unwrap().rcode(), RCODE::NameError);
    }
}
