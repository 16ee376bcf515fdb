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
/// The end user's network address as the gateway saw it.
pub const CLIENT_ADDRESS: &str = "x-vibebox-client-address";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The teams whose policy overlays the end user may see in `GetPolicy`:
/// `*` for every team (platform admins and auditors), otherwise team ids
/// separated by commas (set by the gateway only; absent means none).
pub const VISIBLE_TEAMS: &str = "x-vibebox-visible-teams";
