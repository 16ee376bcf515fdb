//! `gate egress`: the listeners of an environment's egress gate. Every
//! listener binds the gate's address on the environment's network only
//! (never the outbound side, so no other environment's traffic can use this
//! gate); every connection is decided by [`Policy`] on the address actually
//! dialled.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use simple_dns::{Packet, QTYPE, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::destination::{NameGrant, Policy, Refusal, canonical_name};
use crate::dns::{Answer, Resolver, reply};
use crate::events::{Events, GateEvent};
use crate::sniff::{self, Parse};
use crate::{CONFIG_ENV, EgressConfig, PROXY_PORT};

/// Connections open at once per gate.
const MAX_CONNECTIONS: usize = 256;
/// DNS questions in flight at once per gate.
const MAX_QUESTIONS: usize = 64;
/// How long a client has to say where it goes.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn run() -> i32 {
    let config: EgressConfig = match std::env::var(CONFIG_ENV)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gate: no valid {CONFIG_ENV}: {e}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gate: {e}");
            return 1;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("gate: {e}");
            1
        }
    }
}

struct Gate {
    policy: Policy,
    resolver: Resolver,
    events: Events,
    listen: Ipv4Addr,
    connections: Arc<Semaphore>,
}

/// The gateways of this network namespace (the engine host's addresses as
/// the gate sees them).
fn gateways() -> Vec<ipnet::IpNet> {
    std::fs::read_to_string("/proc/net/route")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let hex = line.split_whitespace().nth(2)?;
            let raw = u32::from_str_radix(hex, 16).ok()?;
            (raw != 0).then(|| {
                let ip = Ipv4Addr::from(raw.swap_bytes());
                ipnet::IpNet::from(IpAddr::V4(ip))
            })
        })
        .collect()
}

async fn serve(config: EgressConfig) -> std::io::Result<()> {
    let mut policy = Policy::new(config.mode, &config.rules, &config.deny);
    policy.deny_also(gateways());
    policy.deny_also([ipnet::IpNet::from(IpAddr::V4(config.listen))]);
    let servers = if config.upstream_dns.is_empty() {
        Resolver::system_servers()
    } else {
        config.upstream_dns.clone()
    };
    let gate = Arc::new(Gate {
        policy,
        resolver: Resolver::new(servers),
        events: Events::default(),
        listen: config.listen,
        connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    });

    let udp = UdpSocket::bind((config.listen, 53)).await?;
    let proxy = TcpListener::bind((config.listen, PROXY_PORT)).await?;
    let mut transparent = Vec::new();
    for port in config.transparent_ports() {
        transparent.push((port, TcpListener::bind((config.listen, port)).await?));
    }
    gate.events.emit(&GateEvent::Ready {
        listen: config.listen.to_string(),
    });

    tokio::spawn(report_counts(gate.clone()));
    tokio::spawn(serve_dns(gate.clone(), udp));
    for (port, listener) in transparent {
        tokio::spawn(accept(gate.clone(), listener, Some(port)));
    }
    accept(gate, proxy, None).await;
    Ok(())
}

async fn report_counts(gate: Arc<Gate>) {
    let mut last = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = gate.events.counts();
        if now != last {
            last = now;
            gate.events.emit(&GateEvent::EgressCounts {
                allowed: now.0,
                denied: now.1,
            });
        }
    }
}

async fn serve_dns(gate: Arc<Gate>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let questions = Arc::new(Semaphore::new(MAX_QUESTIONS));
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        // Over the bound the question is dropped; the client retries.
        let Ok(permit) = questions.clone().try_acquire_owned() else {
            continue;
        };
        let bytes = buf[..n].to_vec();
        let (gate, socket) = (gate.clone(), socket.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(query) = Packet::parse(&bytes) else {
                return;
            };
            let answer = gate.answer(&query).await;
            if let Some(out) = reply(&query, &answer, gate.listen) {
                let _ = socket.send_to(&out, from).await;
            }
        });
    }
}

async fn accept(gate: Arc<Gate>, listener: TcpListener, transparent: Option<u16>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = gate.connections.clone().try_acquire_owned() else {
            // Over the bound: refuse at once rather than queue.
            drop(stream);
            continue;
        };
        let gate = gate.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            match transparent {
                Some(port) => gate.transparent(stream, port).await,
                None => gate.proxy(stream).await,
            }
        });
    }
}

/// Why a dial failed.
enum DialError {
    Refused(Refusal, String),
    Connect(String),
}

impl Gate {
    async fn answer(&self, query: &Packet<'_>) -> Answer {
        let Some(question) = query.questions.first() else {
            return Answer::NoSuchName;
        };
        let raw = question.qname.to_string();
        let Some(name) = canonical_name(&raw) else {
            return Answer::NoSuchName;
        };
        let grant = match self.policy.admit_name(&name, None) {
            Ok(g) => g,
            Err(Refusal::ModeNone) => {
                self.refuse(&name, "", Refusal::ModeNone);
                return Answer::Refused;
            }
            Err(r) => {
                self.refuse(&name, "", r);
                return Answer::NoSuchName;
            }
        };
        if question.qtype != QTYPE::TYPE(TYPE::A) {
            return Answer::NoData;
        }
        match self.resolve(&name, None, grant).await {
            Ok(_) => Answer::Gate,
            Err(DialError::Refused(r, address)) => {
                self.refuse(&name, &address, r);
                Answer::NoSuchName
            }
            Err(DialError::Connect(_)) => Answer::NoSuchName,
        }
    }

    fn refuse(&self, destination: &str, address: &str, why: Refusal) {
        self.events
            .denied(destination, address, why.code(), &why.to_string());
    }

    /// The first address of `name` this environment may reach on `port`.
    async fn resolve(
        &self,
        name: &str,
        port: Option<u16>,
        grant: NameGrant,
    ) -> Result<IpAddr, DialError> {
        let addrs = self
            .resolver
            .resolve(name)
            .await
            .map_err(|e| DialError::Connect(format!("cannot resolve {name}: {}", e.0)))?;
        let mut first_refusal = None;
        for ip in addrs {
            match self.policy.admit_address(ip, port, grant) {
                Ok(()) => return Ok(ip),
                Err(r) => {
                    first_refusal.get_or_insert((r, ip.to_string()));
                }
            }
        }
        let (r, address) = first_refusal.unwrap_or((Refusal::Unresolvable, String::new()));
        Err(DialError::Refused(r, address))
    }

    /// Decides and dials `host:port` (a name or an address literal).
    async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = if let Ok(ip) = host.parse::<IpAddr>() {
            self.policy
                .admit_literal(ip, port)
                .map_err(|r| DialError::Refused(r, ip.to_string()))?;
            ip
        } else {
            let name = canonical_name(host)
                .ok_or_else(|| DialError::Refused(Refusal::NotAllowed, String::new()))?;
            let grant = self
                .policy
                .admit_name(&name, Some(port))
                .map_err(|r| DialError::Refused(r, String::new()))?;
            self.resolve(&name, Some(port), grant).await?
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port)))
            .await
            .map_err(|_| DialError::Connect(format!("connect to {ip}:{port} timed out")))?
            .map_err(|e| DialError::Connect(format!("connect to {ip}:{port}: {e}")))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Dials for a proxy client; a failure is answered (403 for a refusal
    /// by policy, 502 for an unreachable destination).
    async fn dial_for_proxy(
        &self,
        client: &mut TcpStream,
        host: &str,
        port: u16,
    ) -> Option<TcpStream> {
        match self.dial_counted(host, port).await {
            Ok(s) => Some(s),
            Err((refused, why)) => {
                let _ = respond(client, if refused { 403 } else { 502 }, &why).await;
                None
            }
        }
    }

    /// Dials, counting and reporting the outcome; on failure, whether policy
    /// refused and why.
    async fn dial_counted(&self, host: &str, port: u16) -> Result<TcpStream, (bool, String)> {
        // What the client named, bounded: it goes into events and the audit.
        let shown = canonical_name(host).unwrap_or_else(|| host.chars().take(64).collect());
        let destination = if shown.contains(':') {
            format!("[{shown}]:{port}")
        } else {
            format!("{shown}:{port}")
        };
        match self.dial(host, port).await {
            Ok(s) => {
                self.events.allowed();
                Ok(s)
            }
            Err(DialError::Refused(r, address)) => {
                self.refuse(&destination, &address, r);
                Err((true, format!("egress to {destination} refused: {r}")))
            }
            Err(DialError::Connect(e)) => Err((false, e)),
        }
    }

    /// A connection to one of the transparent ports: the destination name
    /// comes from TLS SNI or the HTTP Host header.
    async fn transparent(&self, mut client: TcpStream, port: u16) {
        // The whole head within HEAD_TIMEOUT (not per read: one byte every
        // few seconds would hold a connection slot for hours).
        let head = tokio::time::timeout(HEAD_TIMEOUT, self.transparent_head(&mut client, port));
        let Ok(Some((name, buf))) = head.await else {
            return;
        };
        let Ok(mut upstream) = self.dial_counted(&name, port).await else {
            return;
        };
        if upstream.write_all(&buf).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }

    /// Reads until the destination name is known: (name, bytes read).
    async fn transparent_head(
        &self,
        client: &mut TcpStream,
        port: u16,
    ) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::with_capacity(2048);
        loop {
            let parsed = if buf.is_empty() {
                Parse::Partial
            } else if sniff::looks_like_tls(&buf) {
                sniff::client_hello_sni(&buf)
            } else {
                match sniff::request_head(&buf) {
                    Parse::Done(head) => Parse::Done(
                        head.header("host")
                            .and_then(|h| sniff::authority(h, port))
                            .map(|(h, _)| h),
                    ),
                    Parse::Partial => Parse::Partial,
                    Parse::Invalid => Parse::Invalid,
                }
            };
            match parsed {
                Parse::Done(Some(name))
                    if name.parse::<IpAddr>().is_ok() || canonical_name(&name).is_some() =>
                {
                    return Some((name, buf));
                }
                Parse::Done(_) | Parse::Invalid => {
                    let who = format!("{}:{port}", self.listen);
                    self.refuse(&who, "", Refusal::NoDestination);
                    return None;
                }
                Parse::Partial => {}
            }
            if buf.len() >= sniff::MAX_HEAD {
                return None;
            }
            let mut chunk = [0u8; 4096];
            match client.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// The HTTP proxy: `CONNECT host:port` and absolute-form requests.
    async fn proxy(&self, mut client: TcpStream) {
        let read = tokio::time::timeout(HEAD_TIMEOUT, proxy_head(&mut client));
        let Ok(Some((head, buf))) = read.await else {
            let _ = respond(&mut client, 400, "bad or slow proxy request").await;
            return;
        };
        let rest = buf[head.len..].to_vec();
        if head.method == "CONNECT" {
            let Some((host, port)) = sniff::authority(&head.target, 443) else {
                let _ = respond(&mut client, 400, "CONNECT needs host:port").await;
                return;
            };
            let Some(mut upstream) = self.dial_for_proxy(&mut client, &host, port).await else {
                return;
            };
            if client
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await
                .is_err()
                || upstream.write_all(&rest).await.is_err()
            {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            return;
        }
        let Some((host, port, path)) = sniff::absolute_target(&head.target) else {
            let _ = respond(&mut client, 400, "only CONNECT and http:// targets").await;
            return;
        };
        let Some(mut upstream) = self.dial_for_proxy(&mut client, &host, port).await else {
            return;
        };
        let mut out = format!("{} {} {}\r\n", head.method, path, head.version);
        for (name, value) in &head.headers {
            if name.to_ascii_lowercase().starts_with("proxy-") {
                continue;
            }
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        if upstream.write_all(out.as_bytes()).await.is_err()
            || upstream.write_all(&rest).await.is_err()
        {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// Reads a proxy request head (bounded by [`sniff::MAX_HEAD`]): the head
/// and every byte read.
async fn proxy_head(client: &mut TcpStream) -> Option<(sniff::RequestHead, Vec<u8>)> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        match sniff::request_head(&buf) {
            Parse::Done(h) => return Some((h, buf)),
            Parse::Invalid => return None,
            Parse::Partial => {}
        }
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

async fn respond(client: &mut TcpStream, code: u16, message: &str) -> std::io::Result<()> {
    let reason = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        _ => "Bad Gateway",
    };
    let body = format!("vibebox egress: {message}\n");
    let text = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(text.as_bytes()).await?;
    client.shutdown().await
}
