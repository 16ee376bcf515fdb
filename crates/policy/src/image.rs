//! Docker image references: parsing per the Docker reference grammar,
//! canonicalization, and the wildcard patterns of the image allow/deny lists.
//!
//! Canonical form: `registry/path[:tag][@digest]`, with `docker.io` (and
//! `library/` for single-component names) implied, Docker Hub's alias hosts
//! folded into `docker.io`, the name lower-cased, and a missing tag meaning
//! `latest` unless a digest is given. The canonical string is what the
//! orchestrator runs, so what is judged is exactly what is applied.

use std::fmt;

use wildmatch::WildMatch;

/// The default registry.
pub const DOCKER_HUB: &str = "docker.io";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed, canonical image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    canonical: String,
    /// End of `registry` in `canonical`.
    registry_end: usize,
    /// End of `registry/path`.
    name_end: usize,
    tag: Option<(usize, usize)>,
    digest: Option<(usize, usize)>,
}

/// Why an image reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference contains whitespace or control characters")]
    BadCharacter,
    #[error("invalid registry host")]
    BadRegistry,
    #[error("invalid repository path component")]
    BadPath,
    #[error("repository name is longer than 255 characters")]
    NameTooLong,
    #[error("invalid tag")]
    BadTag,
    #[error("invalid digest")]
    BadDigest,
    #[error("64 hexadecimal digits are an image id, not a repository name")]
    ImageId,
}

impl ImageRef {
    /// Parses a reference as written by a user.
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        if input.is_empty() {
            return Err(ImageError::Empty);
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ImageError::BadCharacter);
        }
        // Docker runs 64 lower-case hex digits as a local image id, never as
        // the repository this would canonicalize to.
        if input.len() == 64
            && input
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ImageError::ImageId);
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (input, None),
        };
        if let Some(d) = digest {
            validate_digest(d)?;
        }
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&name_tag[..i], Some(&name_tag[i + 1..]))
            }
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            validate_tag(t)?;
        }
        let name = name.to_ascii_lowercase();
        let (registry, path) = split_registry(&name);
        validate_registry(registry)?;
        let registry = match registry {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB,
            r => r,
        };
        if path.is_empty() || !path.split('/').all(valid_path_component) {
            return Err(ImageError::BadPath);
        }
        let library = registry == DOCKER_HUB && !path.contains('/');

        let mut canonical = String::with_capacity(input.len() + 24);
        canonical.push_str(registry);
        let registry_end = canonical.len();
        canonical.push('/');
        if library {
            canonical.push_str("library/");
        }
        canonical.push_str(path);
        let name_end = canonical.len();
        if name_end > MAX_NAME_LEN {
            return Err(ImageError::NameTooLong);
        }
        let tag = match (tag, digest) {
            (Some(t), _) => Some(t),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        };
        let tag = tag.map(|t| {
            canonical.push(':');
            let start = canonical.len();
            canonical.push_str(t);
            (start, canonical.len())
        });
        let digest = digest.map(|d| {
            canonical.push('@');
            let start = canonical.len();
            canonical.push_str(d);
            (start, canonical.len())
        });
        Ok(Self {
            canonical,
            registry_end,
            name_end,
            tag,
            digest,
        })
    }

    /// The full canonical reference.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    pub fn into_canonical(self) -> String {
        self.canonical
    }

    /// `docker.io`, `ghcr.io`, `localhost:5000`...
    pub fn registry(&self) -> &str {
        &self.canonical[..self.registry_end]
    }

    /// The repository path without the registry: `library/python`.
    pub fn path(&self) -> &str {
        &self.canonical[self.registry_end + 1..self.name_end]
    }

    /// `registry/path`.
    pub fn name(&self) -> &str {
        &self.canonical[..self.name_end]
    }

    /// The last path component: `python` for `docker.io/library/python`.
    pub fn repository(&self) -> &str {
        let name = self.name();
        &name[name.rfind('/').map_or(0, |i| i + 1)..]
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.map(|(s, e)| &self.canonical[s..e])
    }

    pub fn digest(&self) -> Option<&str> {
        self.digest.map(|(s, e)| &self.canonical[s..e])
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// Docker's rule: the first component is a registry if it contains `.` or
/// `:` or is `localhost`; otherwise the name lives on Docker Hub.
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first, rest),
        _ => (DOCKER_HUB, name),
    }
}

fn validate_registry(registry: &str) -> Result<(), ImageError> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        // [IPv6]:port
        let (ip, after) = rest.split_once(']').ok_or(ImageError::BadRegistry)?;
        // Docker's grammar: hex digits and colons only (no dotted
        // IPv4-mapped form, no zone).
        if ip.parse::<std::net::Ipv6Addr>().is_err()
            || !ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
        {
            return Err(ImageError::BadRegistry);
        }
        match after {
            "" => return Ok(()),
            p => (
                None,
                Some(p.strip_prefix(':').ok_or(ImageError::BadRegistry)?),
            ),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let ok = !host.is_empty()
            && host.split('.').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !c.starts_with('-')
                    && !c.ends_with('-')
            });
        if !ok {
            return Err(ImageError::BadRegistry);
        }
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
            _ => return Err(ImageError::BadRegistry),
        }
    }
    Ok(())
}

/// `[a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn validate_tag(tag: &str) -> Result<(), ImageError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-');
    if ok { Ok(()) } else { Err(ImageError::BadTag) }
}

/// `algorithm:hex` for an algorithm the engine can verify: go-digest knows
/// sha256, sha384 and sha512, each with exactly 64, 96 or 128 lower-case hex
/// digits. The reference grammar admits other algorithms, but Docker refuses
/// them (`unsupported digest algorithm`), so they are invalid here.
fn validate_digest(d: &str) -> Result<(), ImageError> {
    let (alg, hex) = d.split_once(':').ok_or(ImageError::BadDigest)?;
    let len = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(ImageError::BadDigest),
    };
    let lower_hex = hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex.len() == len && lower_hex {
        Ok(())
    } else {
        Err(ImageError::BadDigest)
    }
}

/// Which part of a reference a pattern's name is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `registry/path`.
    Name,
    /// The last path component in any registry or namespace (deny lists).
    Repository,
}

/// One entry of an image allow or deny list, for example `docker:*`,
/// `*:latest`, `ghcr.io/acme/*`, `python@sha256:*`.
///
/// The name part is canonicalized like a reference (`docker.io/`, `library/`
/// implied). In a deny list a name without `/` matches that repository in
/// any registry and namespace (so mirrors and namespace spellings are caught);
/// in an allow list it means the official Docker Hub image, and `*` means any.
/// The tag part (case-sensitive) is compared with the tag, `""` when the
/// reference has only a digest; a pattern without tag accepts any tag.
#[derive(Debug, Clone)]
pub struct ImagePattern {
    source: String,
    scope: Scope,
    name: WildMatch,
    /// Deny lists: the Docker Hub reading of a first component with a
    /// wildcard and no `.`/`:` (`acme*/app`), matched as well as the
    /// registry reading in `name`.
    hub_name: Option<WildMatch>,
    tag: Option<WildMatch>,
    digest: Option<WildMatch>,
}

/// Whether a pattern belongs to an allow or a deny list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Allow,
    Deny,
}

impl ImagePattern {
    pub fn new(pattern: &str, kind: ListKind) -> Result<Self, ImageError> {
        if pattern.is_empty() {
            return Err(ImageError::Empty);
        }
        if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ImageError::BadCharacter);
        }
        let (name_tag, digest) = match pattern.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (pattern, None),
        };
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        if name.is_empty() || tag == Some("") {
            return Err(ImageError::BadPath);
        }
        let name = name.to_ascii_lowercase();
        // `acme*/app` is a Docker Hub namespace by Docker's rule (no `.`, no
        // `:`, not localhost) and a registry by the wildcard reading below;
        // a deny entry takes both, so neither spelling escapes it.
        let hub_name = match name.split_once('/') {
            Some((first, _))
                if kind == ListKind::Deny
                    && first.contains(['*', '?'])
                    && !first.contains(['.', ':']) =>
            {
                Some(WildMatch::new(&format!("{DOCKER_HUB}/{name}")))
            }
            _ => None,
        };
        let (scope, name) = if !name.contains('/') {
            match kind {
                ListKind::Deny => (Scope::Repository, name),
                ListKind::Allow if name == "*" => (Scope::Name, name),
                ListKind::Allow => (Scope::Name, format!("{DOCKER_HUB}/library/{name}")),
            }
        } else {
            let (first, rest) = name.split_once('/').unwrap_or(("", &name));
            let is_registry = first.contains(['.', ':', '*', '?']) || first == "localhost";
            let (registry, path) = if is_registry {
                (first, rest)
            } else {
                (DOCKER_HUB, name.as_str())
            };
            let registry = match registry {
                "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
                    DOCKER_HUB
                }
                r => r,
            };
            let library = if registry == DOCKER_HUB && !path.contains('/') {
                "library/"
            } else {
                ""
            };
            (Scope::Name, format!("{registry}/{library}{path}"))
        };
        Ok(Self {
            source: pattern.to_owned(),
            scope,
            name: WildMatch::new(&name),
            hub_name,
            tag: tag.map(WildMatch::new),
            digest: digest.map(WildMatch::new),
        })
    }

    /// The pattern as written in the policy.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, image: &ImageRef) -> bool {
        let name = match self.scope {
            Scope::Name => image.name(),
            Scope::Repository => image.repository(),
        };
        let name_ok = self.name.matches(name)
            || (self.scope == Scope::Name
                && self.hub_name.as_ref().is_some_and(|h| h.matches(name)));
        name_ok
            && self
                .tag
                .as_ref()
                .is_none_or(|t| t.matches(image.tag().unwrap_or("")))
            && self
                .digest
                .as_ref()
                .is_none_or(|d| image.digest().is_some_and(|x| d.matches(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn canonicalizes_per_docker_rules() {
        let cases = [
            ("python", "docker.io/library/python:latest"),
            ("python:3.12", "docker.io/library/python:3.12"),
            ("library/python:3.12", "docker.io/library/python:3.12"),
            ("docker.io/python:3.12", "docker.io/library/python:3.12"),
            (
                "index.docker.io/library/python:3.12",
                "docker.io/library/python:3.12",
            ),
            (
                "registry-1.docker.io/python:3",
                "docker.io/library/python:3",
            ),
            ("PYTHON:3.12", "docker.io/library/python:3.12"),
            (
                "Docker.IO/Library/Python:3.12",
                "docker.io/library/python:3.12",
            ),
            ("acme/app:v1", "docker.io/acme/app:v1"),
            ("ghcr.io/acme/app", "ghcr.io/acme/app:latest"),
            ("localhost/app:1", "localhost/app:1"),
            ("localhost:5000/a/b/c:1.0", "localhost:5000/a/b/c:1.0"),
            ("10.0.0.1:5000/app:Tag_X", "10.0.0.1:5000/app:Tag_X"),
            ("[::1]:5000/app:1", "[::1]:5000/app:1"),
            (
                "my-reg.example.com/a__b/c-d.e:1",
                "my-reg.example.com/a__b/c-d.e:1",
            ),
            (
                &format!("python@{DIGEST}"),
                &format!("docker.io/library/python@{DIGEST}"),
            ),
            (
                &format!("python:3@{DIGEST}"),
                &format!("docker.io/library/python:3@{DIGEST}"),
            ),
        ];
        for (input, want) in cases {
            let r = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.canonical(), want, "{input}");
        }
        let r = ImageRef::parse("ghcr.io/acme/tools/app:1").unwrap();
        assert_eq!(r.registry(), "ghcr.io");
        assert_eq!(r.path(), "acme/tools/app");
        assert_eq!(r.repository(), "app");
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.digest(), None);
    }

    #[test]
    fn rejects_invalid_references() {
        let bad = [
            "",
            " python",
            "python ",
            "py thon",
            "python:",
            ":tag",
            "python::1",
            "/python",
            "python/",
            "a//b",
            "-python",
            "python-",
            "py..thon",
            "py___thon",
            "python:-bad",
            "python:.bad",
            "python:a/b",
            "python@sha256:abc",
            "python@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "python@md5",
            "-bad.io/app",
            "bad.io:0/app",
            "bad.io:99999/app",
            "bad.io:x/app",
            "[zz]/app",
            "a@b@c",
            "python\n",
            "python\0",
        ];
        for input in bad {
            assert!(
                ImageRef::parse(input).is_err(),
                "{input:?} should be invalid"
            );
        }
        let long = format!("{}:1", "a".repeat(300));
        assert_eq!(ImageRef::parse(&long), Err(ImageError::NameTooLong));
        let long_tag = format!("a:{}", "t".repeat(129));
        assert_eq!(ImageRef::parse(&long_tag), Err(ImageError::BadTag));
    }

    fn deny(p: &str, image: &str) -> bool {
        ImagePattern::new(p, ListKind::Deny)
            .unwrap()
            .matches(&ImageRef::parse(image).unwrap())
    }

    fn allow(p: &str, image: &str) -> bool {
        ImagePattern::new(p, ListKind::Allow)
            .unwrap()
            .matches(&ImageRef::parse(image).unwrap())
    }

    #[test]
    fn deny_patterns_catch_every_spelling() {
        for image in [
            "docker:24-dind",
            "docker",
            "DOCKER:24-dind",
            "library/docker:24",
            "docker.io/library/docker:24-dind",
            "index.docker.io/library/docker:24",
            "registry-1.docker.io/docker:cli",
            "mirror.example.com/library/docker:24",
            "localhost:5000/docker:24",
            &format!("docker@{DIGEST}"),
        ] {
            assert!(deny("docker:*", image), "{image}");
        }
        assert!(deny("dind:*", "acme/dind:1"));
        assert!(deny("*:latest", "python"));
        assert!(deny("*:latest", "ghcr.io/acme/app"));
        assert!(!deny("*:latest", "python:3.12"));
        assert!(!deny("*:latest", &format!("python@{DIGEST}")));
        assert!(!deny("docker:*", "python:3.12"));
        assert!(!deny("docker:*", "dockerfile-lint:1"));
        assert!(deny("acme/*", "docker.io/acme/app:1"));
        assert!(!deny("acme/*", "ghcr.io/acme/app:1"));
        assert!(deny("*/acme/*", "ghcr.io/acme/app:1"));
        assert!(deny("python@sha256:*", &format!("python@{DIGEST}")));
        assert!(!deny("python@sha256:*", "python:3"));
    }

    #[test]
    fn allow_patterns_are_strict() {
        assert!(allow("*", "ghcr.io/acme/app:1"));
        assert!(allow("python:*", "python:3.12"));
        assert!(allow("python:*", "docker.io/library/python:3.12"));
        assert!(!allow("python:*", "evil.io/library/python:3.12"));
        assert!(!allow("python:*", "acme/python:3.12"));
        assert!(allow("ghcr.io/acme/*", "ghcr.io/acme/app:1"));
        assert!(!allow("ghcr.io/acme/*", "ghcr.io/other/app:1"));
        assert!(allow("acme/*:v*", "acme/app:v2"));
        assert!(!allow("acme/*:v*", "acme/app:2"));
    }

    // Found by the fuzz oracle (fuzz/src/oracle.rs), which reads references
    // by Docker's rules: distribution/reference hands the digest to
    // go-digest, which knows sha256, sha384 and sha512 only, each with its
    // exact length of lower-case hex; the engine refuses anything else.
    #[test]
    fn digests_are_those_docker_can_verify() {
        let hex = |n: usize| "0123456789abcdef".repeat(8)[..n].to_owned();
        for ok in [
            format!("python@sha256:{}", hex(64)),
            format!("python@sha384:{}", hex(96)),
            format!("python@sha512:{}", hex(128)),
        ] {
            assert!(ImageRef::parse(&ok).is_ok(), "{ok}");
        }
        for bad in [
            format!("python@md5:{}", hex(32)),
            format!("python@sha257:{}", hex(64)),
            format!("python@SHA256:{}", hex(64)),
            format!("python@sha384:{}", hex(64)),
            format!("python@sha384:{}", hex(96).to_ascii_uppercase()),
            format!("python@sha256+b64:{}", hex(64)),
        ] {
            assert_eq!(ImageRef::parse(&bad), Err(ImageError::BadDigest), "{bad}");
        }
    }

    // Found by the fuzz oracle: Docker reads 64 lower-case hex digits as an
    // image id (`docker run <id>`), and ParseNormalizedNamed refuses them as
    // a name; the policy made them the Hub repository `library/<hex>`.
    #[test]
    fn an_image_id_is_not_a_repository() {
        let id = "0123456789abcdef".repeat(4);
        assert_eq!(ImageRef::parse(&id), Err(ImageError::ImageId));
        assert!(ImageRef::parse(&format!("{id}:1")).is_ok());
        assert!(ImageRef::parse(&format!("acme/{id}")).is_ok());
        assert!(ImageRef::parse(&id.to_ascii_uppercase()).is_ok());
    }

    // Found by the fuzz oracle: Docker's host grammar takes only hex digits
    // and colons between brackets (no IPv4-mapped dotted form).
    #[test]
    fn ipv6_registries_as_docker_spells_them() {
        assert!(ImageRef::parse("[fe80::1]:5000/app:1").is_ok());
        assert_eq!(
            ImageRef::parse("[::ffff:10.0.0.1]:5000/app:1"),
            Err(ImageError::BadRegistry)
        );
    }

    // Found by the fuzz oracle: a first component with a wildcard but no
    // `.` or `:` reads as a Docker Hub namespace under Docker's rule
    // (`acme*/app` is docker.io/acme*/app), and the pattern code read it
    // as a registry, so `acme1/app` escaped a deny entry `acme*/app`. A deny
    // entry now covers both readings.
    #[test]
    fn deny_patterns_with_a_wildcard_namespace_cover_docker_hub() {
        assert!(deny("acme*/app:*", "acme1/app:1"));
        assert!(deny("acme*/app:*", "docker.io/acme-tools/app:1"));
        assert!(
            deny("acme*/app:*", "acme.io/app:1"),
            "the registry reading stays"
        );
        assert!(deny("?/app", "x/app:1"));
        assert!(!deny("acme*/app:*", "ghcr.io/acme/app:1"));
        assert!(deny("*/acme/*", "acme/x:1") && deny("*/acme/*", "ghcr.io/acme/x:1"));
    }
}
