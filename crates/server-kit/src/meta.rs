//! Metadata keys shared by the services.
//!
//! The `x-vibebox-*` caller keys are set by the gateway after it has
//! authenticated the end user; internal services trust them only because the
//! caller proved, with its client certificate, that it is the gateway.

/// Request id: taken from the client when present, generated otherwise, and
/// returned on every response.
pub const REQUEST_ID: &str = "x-request-id";
/// The authenticated end user (set by the gateway only).
pub const USER_ID: &str = "x-vibebox-user-id";
/// The id of the token the end user presented (set by the gateway only).
pub const TOKEN_ID: &str = "x-vibebox-token-id";
/// The kind of the authenticated caller, `user` or `service_account`, as
/// identity told the gateway (set by the gateway only; absent: unknown).
pub const ACTOR_KIND: &str = "x-vibebox-actor-kind";
/// The end user's network address as the gateway saw it.
pub const CLIENT_ADDRESS: &str = "x-vibebox-client-address";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The teams whose policy overlays the end user may see in `GetPolicy`:
/// `*` for every team (platform admins and auditors), otherwise team ids
/// separated by commas (set by the gateway only; absent means none).
pub const VISIBLE_TEAMS: &str = "x-vibebox-visible-teams";

/// The key of a client address for every per-source limit (the gateway's
/// and identity's alike, so that they cannot drift apart): its IP (`ip:port`
/// and bare IPs alike; an IPv4-mapped IPv6 address as IPv4; IPv6 by its
/// /64). Anything else (no address at all) is one shared "unknown" source.
pub fn source_key(address: &str) -> String {
    let ip = address
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| address.parse::<std::net::IpAddr>());
    match ip.map(|ip| ip.to_canonical()) {
        Ok(std::net::IpAddr::V4(v4)) => v4.to_string(),
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => "unknown".to_owned(),
    }
}
