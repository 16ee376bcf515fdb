//! Path normalization for host paths (bind sources) and container paths
//! (mount targets): resolves `.`, `..` and repeated or trailing slashes
//! lexically, so that spellings of one path compare equal.
//!
//! Symlinks on the host cannot be resolved here (the policy service need not
//! run on the Docker host); the rules that use these paths therefore compare
//! deny-lists case-insensitively and treat ancestors of sensitive paths as
//! sensitive, which errs on the side of denial.

/// Why a path was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path must be absolute")]
    NotAbsolute,
    #[error("path contains a NUL or control character")]
    BadCharacter,
    #[error("path is longer than 4096 bytes")]
    TooLong,
}

const MAX_PATH: usize = 4096;

/// Normalizes an absolute path: `//var/./run/../run/docker.sock/` becomes
/// `/var/run/docker.sock`; `..` at the root stays at the root.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if path.chars().any(char::is_control) {
        return Err(PathError::BadCharacter);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Ok("/".to_owned());
    }
    let mut out = String::with_capacity(path.len());
    for p in parts {
        out.push('/');
        out.push_str(p);
    }
    Ok(out)
}

/// Whether normalized `path` is `prefix` or lies below it.
pub fn is_within(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// [`is_within`] ignoring ASCII case (for deny checks: case-insensitive
/// filesystems exist, and denying more is the safe direction).
pub fn is_within_ignore_case(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path.eq_ignore_ascii_case(prefix)
        || (path.len() > prefix.len()
            && path.is_char_boundary(prefix.len())
            && path[..prefix.len()].eq_ignore_ascii_case(prefix)
            && path.as_bytes()[prefix.len()] == b'/')
}

/// Whether one of the two normalized paths contains the other (ignoring
/// case): mounting either exposes part of the other.
pub fn overlaps_ignore_case(a: &str, b: &str) -> bool {
    is_within_ignore_case(a, b) || is_within_ignore_case(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_spellings() {
        let cases = [
            ("/", "/"),
            ("//", "/"),
            ("/..", "/"),
            ("/../../etc", "/etc"),
            ("/var/run/docker.sock", "/var/run/docker.sock"),
            ("//var//run//docker.sock", "/var/run/docker.sock"),
            ("/var/run/docker.sock/", "/var/run/docker.sock"),
            ("/var/./run/./docker.sock", "/var/run/docker.sock"),
            ("/var/lib/../run/docker.sock", "/var/run/docker.sock"),
            ("/tmp/../var/run/docker.sock", "/var/run/docker.sock"),
            ("/home/dev/project/", "/home/dev/project"),
            ("/a/b/c/../../..", "/"),
            ("/a/.../b", "/a/.../b"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn rejects_bad_paths() {
        assert_eq!(normalize(""), Err(PathError::Empty));
        assert_eq!(normalize("var/run"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("./x"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("~/x"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a\0b"), Err(PathError::BadCharacter));
        assert_eq!(normalize("/a\nb"), Err(PathError::BadCharacter));
        assert_eq!(
            normalize(&format!("/{}", "a".repeat(5000))),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn containment() {
        assert!(is_within("/etc/passwd", "/etc"));
        assert!(is_within("/etc", "/etc"));
        assert!(!is_within("/etcetera", "/etc"));
        assert!(is_within("/anything", "/"));
        assert!(is_within_ignore_case("/ETC/passwd", "/etc"));
        assert!(!is_within_ignore_case("/etcx", "/etc"));
        assert!(overlaps_ignore_case("/var", "/var/lib/docker"));
        assert!(overlaps_ignore_case(
            "/var/lib/docker/volumes",
            "/var/lib/docker"
        ));
        assert!(!overlaps_ignore_case("/home/dev", "/var/lib/docker"));
    }
}
