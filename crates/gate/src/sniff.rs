//! Where a client means to go, read from its first bytes: the server name
//! of a TLS ClientHello, or the target of an HTTP request (Host header,
//! absolute-form or CONNECT authority). Pure parsers over untrusted input:
//! bounded, no panics.

/// Parsed HTTP request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent.
    pub target: String,
    pub version: String,
    /// Header lines (name, value), in order.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, the empty line included.
    pub len: usize,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a head parse found.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse<T> {
    Done(T),
    /// More bytes are needed.
    Partial,
    Invalid,
}

/// Largest request head the gate reads.
pub const MAX_HEAD: usize = 16 * 1024;

/// Parses an HTTP/1.x request head from the start of `buf`.
pub fn request_head(buf: &[u8]) -> Parse<RequestHead> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() >= MAX_HEAD {
            Parse::Invalid
        } else {
            Parse::Partial
        };
    };
    if end + 4 > MAX_HEAD {
        return Parse::Invalid;
    }
    let Ok(text) = std::str::from_utf8(&buf[..end]) else {
        return Parse::Invalid;
    };
    let mut lines = text.split("\r\n");
    let Some(request_line) = lines.next() else {
        return Parse::Invalid;
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parse::Invalid;
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !version.starts_with("HTTP/1.")
        || target.is_empty()
    {
        return Parse::Invalid;
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parse::Invalid;
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Parse::Invalid;
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
        if headers.len() > 100 {
            return Parse::Invalid;
        }
    }
    Parse::Done(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers,
        len: end + 4,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits `host[:port]` (with `[v6]:port` brackets); `default` when no port.
pub fn authority(s: &str, default: u16) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        return (!host.is_empty() && port != 0).then(|| (host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host.to_owned(), port.parse().ok()?)),
        Some(_) => None,
        None => Some((s.to_owned(), default)),
    }
    .filter(|(h, p)| !h.is_empty() && *p != 0)
}

/// An absolute-form target `http://host[:port]/path`: (host, port, path).
pub fn absolute_target(target: &str) -> Option<(String, u16, String)> {
    let rest = target.strip_prefix("http://").or_else(|| {
        target
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("http://"))
            .map(|_| &target[7..])
    })?;
    let (auth, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.contains('@') {
        return None;
    }
    let (host, port) = authority(auth, 80)?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    Some((host, port, path))
}

/// Whether `buf` starts like a TLS handshake record.
pub fn looks_like_tls(buf: &[u8]) -> bool {
    buf.first() == Some(&0x16)
}

/// The server name (SNI) of a TLS ClientHello at the start of `buf`.
pub fn client_hello_sni(buf: &[u8]) -> Parse<Option<String>> {
    // Record header: type(1) version(2) length(2).
    if buf.len() < 5 {
        return Parse::Partial;
    }
    if buf[0] != 0x16 {
        return Parse::Invalid;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if record_len > MAX_HEAD {
        return Parse::Invalid;
    }
    if buf.len() < 5 + record_len {
        return Parse::Partial;
    }
    let mut r = Reader(&buf[5..5 + record_len]);
    match hello(&mut r) {
        Some(sni) => Parse::Done(sni),
        None => Parse::Invalid,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

fn hello(r: &mut Reader<'_>) -> Option<Option<String>> {
    // Handshake header: type 1 = ClientHello.
    if r.u8()? != 1 {
        return None;
    }
    let len = r.u24()?;
    let mut h = Reader(r.take(len)?);
    h.take(2)?; // client version
    h.take(32)?; // random
    let sid = h.u8()?;
    h.take(sid)?;
    let suites = h.u16()?;
    h.take(suites)?;
    let comp = h.u8()?;
    h.take(comp)?;
    if h.0.is_empty() {
        return Some(None);
    }
    let ext_len = h.u16()?;
    let mut ext = Reader(h.take(ext_len)?);
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let len = ext.u16()?;
        let body = ext.take(len)?;
        if kind == 0 {
            let mut sn = Reader(body);
            let list = sn.u16()?;
            let mut list = Reader(sn.take(list)?);
            while !list.0.is_empty() {
                let name_type = list.u8()?;
                let len = list.u16()?;
                let name = list.take(len)?;
                if name_type == 0 {
                    let name = std::str::from_utf8(name).ok()?;
                    return Some((!name.is_empty()).then(|| name.to_owned()));
                }
            }
        }
    }
    Some(None)
}

/// A minimal TLS 1.3 ClientHello carrying `name` as its server name (for
/// tests and benchmarks of the gate: what a client sends first).
pub fn client_hello(name: &str) -> Vec<u8> {
    let mut sni = Vec::new();
    let n = name.as_bytes();
    sni.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
    sni.extend_from_slice(n);
    let mut ext = Vec::new();
    ext.extend_from_slice(&0u16.to_be_bytes());
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // session id
    body.extend_from_slice(&2u16.to_be_bytes());
    body.extend_from_slice(&[0x13, 0x01]);
    body.push(1);
    body.push(0);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_is_read_from_a_client_hello() {
        let hello = client_hello("api.github.com");
        assert_eq!(
            client_hello_sni(&hello),
            Parse::Done(Some("api.github.com".into()))
        );
        assert_eq!(client_hello_sni(&hello[..20]), Parse::Partial);
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), Parse::Invalid);
        // Every truncation of the handshake body is refused, never a panic.
        let mut broken = hello.clone();
        broken[8] = 0xff;
        assert_eq!(client_hello_sni(&broken), Parse::Invalid);
    }

    #[test]
    fn request_heads_and_targets() {
        let head =
            b"GET http://example.com:8080/a?b HTTP/1.1\r\nHost: example.com:8080\r\n\r\nbody";
        let Parse::Done(h) = request_head(head) else {
            panic!("head parses")
        };
        assert_eq!(h.method, "GET");
        assert_eq!(h.header("host"), Some("example.com:8080"));
        assert_eq!(h.len, head.len() - 4);
        assert_eq!(
            absolute_target(&h.target),
            Some(("example.com".into(), 8080, "/a?b".into()))
        );
        assert_eq!(request_head(b"GET / HTTP/1.1\r\nHost: x"), Parse::Partial);
        assert_eq!(request_head(b"get / HTTP/1.1\r\n\r\n"), Parse::Invalid);
        assert_eq!(
            authority("[2001:db8::1]:443", 80),
            Some(("2001:db8::1".into(), 443))
        );
        assert_eq!(
            authority("example.com", 80),
            Some(("example.com".into(), 80))
        );
        assert_eq!(authority("example.com:0", 80), None);
        assert_eq!(authority("a:b:c", 80), None);
        assert_eq!(authority("[]:80", 80), None);
        assert_eq!(authority("[::1]:0", 80), None);
        assert_eq!(absolute_target("http://user@evil/"), None);
        assert_eq!(
            absolute_target("http://198.51.100.10"),
            Some(("198.51.100.10".into(), 80, "/".into()))
        );
    }
}
