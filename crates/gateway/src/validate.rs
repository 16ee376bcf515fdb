//! Field validation done at the edge, before a request travels further.
//!
//! The gateway checks shapes and sizes (ids, names, counts, lengths); the
//! security judgement of a spec is the policy service's.

use vibebox_proto::environment::{ContainerSpec, ExecStart};

/// One invalid field: its path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub(crate) struct FieldViolation {
    pub(crate) field: String,
    pub(crate) description: String,
}

pub(crate) type Result<T = ()> = std::result::Result<T, FieldViolation>;

fn violation(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: description.into(),
    }
}

/// Longest free-text field accepted (descriptions, display names, paths).
const MAX_TEXT: usize = 1024;
/// Longest identifier accepted (ids, request ids, names).
const MAX_ID: usize = 128;

/// A UUID in its canonical hyphenated form.
pub(crate) fn uuid(field: &str, value: &str) -> Result<uuid::Uuid> {
    if value.is_empty() {
        return Err(violation(field, "is required"));
    }
    uuid::Uuid::try_parse(value)
        .ok()
        .filter(|_| value.len() == 36)
        .ok_or_else(|| violation(field, "must be a UUID"))
}

/// A required opaque identifier: 1..=128 characters of `[A-Za-z0-9._:-]`.
pub(crate) fn id(field: &str, value: &str) -> Result {
    if value.is_empty() {
        return Err(violation(field, "is required"));
    }
    optional_id(field, value)
}

/// An optional opaque identifier (empty allowed).
pub(crate) fn optional_id(field: &str, value: &str) -> Result {
    if value.len() > MAX_ID {
        return Err(violation(
            field,
            format!("must be at most {MAX_ID} characters"),
        ));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(violation(
            field,
            "may contain only letters, digits, '.', '_', ':' and '-'",
        ));
    }
    Ok(())
}

/// Free text of bounded length without control characters (newlines allowed).
pub(crate) fn text(field: &str, value: &str, max: usize) -> Result {
    if value.len() > max {
        return Err(violation(field, format!("must be at most {max} bytes")));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(violation(field, "must not contain control characters"));
    }
    Ok(())
}

/// A page size: 0 (server default) to 500.
pub(crate) fn page_size(field: &str, value: i32) -> Result {
    if !(0..=500).contains(&value) {
        return Err(violation(field, "must be between 0 and 500"));
    }
    Ok(())
}

/// An environment name: 1..=63 characters, lower-case letters, digits and
/// '-', starting with a letter or digit.
pub(crate) fn environment_name(field: &str, value: &str) -> Result {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(violation(
            field,
            "must be 1 to 63 lower-case letters, digits or '-', not starting with '-'",
        ))
    }
}

fn list(field: &str, values: &[String], max_items: usize, max_len: usize) -> Result {
    if values.len() > max_items {
        return Err(violation(
            field,
            format!("must have at most {max_items} items"),
        ));
    }
    for (i, value) in values.iter().enumerate() {
        if value.len() > max_len {
            return Err(violation(
                format!("{field}[{i}]"),
                format!("must be at most {max_len} bytes"),
            ));
        }
        if value.contains('\0') {
            return Err(violation(format!("{field}[{i}]"), "must not contain NUL"));
        }
    }
    Ok(())
}

fn map(
    field: &str,
    values: &std::collections::BTreeMap<String, String>,
    max_items: usize,
    max_len: usize,
) -> Result {
    if values.len() > max_items {
        return Err(violation(
            field,
            format!("must have at most {max_items} entries"),
        ));
    }
    for (key, value) in values {
        if key.is_empty() || key.len() > 256 || key.contains(['\0', '=']) {
            return Err(violation(
                format!("{field}[{key:?}]"),
                "keys must be 1 to 256 bytes without '=' or NUL",
            ));
        }
        if value.len() > max_len || value.contains('\0') {
            return Err(violation(
                format!("{field}[{key:?}]"),
                format!("values must be at most {max_len} bytes without NUL"),
            ));
        }
    }
    Ok(())
}

/// Sizes and shapes of a container spec (security rules are policy's).
pub(crate) fn container_spec(field: &str, spec: Option<&ContainerSpec>) -> Result {
    let Some(spec) = spec else {
        return Err(violation(field, "is required"));
    };
    if spec.image.trim().is_empty() {
        return Err(violation(format!("{field}.image"), "is required"));
    }
    text(&format!("{field}.image"), &spec.image, 512)?;
    list(&format!("{field}.command"), &spec.command, 256, 8192)?;
    list(&format!("{field}.entrypoint"), &spec.entrypoint, 64, 8192)?;
    map(&format!("{field}.env"), &spec.env, 256, 32 * 1024)?;
    map(&format!("{field}.labels"), &spec.labels, 64, 1024)?;
    map(&format!("{field}.sysctls"), &spec.sysctls, 64, 256)?;
    text(&format!("{field}.working_dir"), &spec.working_dir, MAX_TEXT)?;
    if let Some(user) = &spec.user {
        text(&format!("{field}.user"), user, 64)?;
    }
    list(&format!("{field}.cap_add"), &spec.cap_add, 64, 64)?;
    list(&format!("{field}.cap_drop"), &spec.cap_drop, 64, 64)?;
    list(
        &format!("{field}.security_opt"),
        &spec.security_opt,
        32,
        256,
    )?;
    if spec.mounts.len() > 32 {
        return Err(violation(
            format!("{field}.mounts"),
            "must have at most 32 items",
        ));
    }
    for (i, mount) in spec.mounts.iter().enumerate() {
        text(
            &format!("{field}.mounts[{i}].source"),
            &mount.source,
            MAX_TEXT,
        )?;
        text(
            &format!("{field}.mounts[{i}].target"),
            &mount.target,
            MAX_TEXT,
        )?;
    }
    if spec.devices.len() > 32 {
        return Err(violation(
            format!("{field}.devices"),
            "must have at most 32 items",
        ));
    }
    if spec.ports.len() > 64 {
        return Err(violation(
            format!("{field}.ports"),
            "must have at most 64 items",
        ));
    }
    for (i, port) in spec.ports.iter().enumerate() {
        if port.container_port == 0 || port.container_port > 65535 {
            return Err(violation(
                format!("{field}.ports[{i}].container_port"),
                "must be between 1 and 65535",
            ));
        }
        if port.host_port > 65535 {
            return Err(violation(
                format!("{field}.ports[{i}].host_port"),
                "must be at most 65535",
            ));
        }
    }
    if let Some(cpu) = spec.cpu_limit
        && !(cpu.is_finite() && cpu > 0.0)
    {
        return Err(violation(
            format!("{field}.cpu_limit"),
            "must be a positive number",
        ));
    }
    if let Some(memory) = spec.memory_limit_mb
        && memory <= 0
    {
        return Err(violation(
            format!("{field}.memory_limit_mb"),
            "must be positive",
        ));
    }
    if let Some(pids) = spec.pids_limit
        && pids <= 0
    {
        return Err(violation(format!("{field}.pids_limit"), "must be positive"));
    }
    for (name, value) in [
        ("network_mode", &spec.network_mode),
        ("pid_mode", &spec.pid_mode),
        ("ipc_mode", &spec.ipc_mode),
        ("uts_mode", &spec.uts_mode),
        ("userns_mode", &spec.userns_mode),
        ("cgroupns_mode", &spec.cgroupns_mode),
    ] {
        text(&format!("{field}.{name}"), value, 256)?;
    }
    Ok(())
}

/// The `start` message of an exec stream.
pub(crate) fn exec_start(start: &ExecStart) -> Result<uuid::Uuid> {
    let id = uuid("start.environment_id", &start.environment_id)?;
    if start.command.is_empty() {
        return Err(violation("start.command", "is required"));
    }
    list("start.command", &start.command, 256, 8192)?;
    map("start.env", &start.env, 256, 32 * 1024)?;
    text("start.working_dir", &start.working_dir, MAX_TEXT)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_requires_canonical_form() {
        assert!(uuid("f", "2f1c3e4a-9b7d-4c1e-8a2b-3c4d5e6f7a8b").is_ok());
        assert_eq!(uuid("f", "").unwrap_err().description, "is required");
        assert!(uuid("f", "2f1c3e4a9b7d4c1e8a2b3c4d5e6f7a8b").is_err());
        assert!(uuid("f", "../etc/passwd").is_err());
    }

    #[test]
    fn ids_reject_odd_characters() {
        assert!(id("team_id", "team-1").is_ok());
        assert!(id("team_id", "").is_err());
        assert!(id("team_id", "a/b").is_err());
        assert!(id("team_id", &"a".repeat(129)).is_err());
    }

    #[test]
    fn spec_needs_an_image_and_sane_sizes() {
        let err = container_spec("spec", None).unwrap_err();
        assert_eq!(err.field, "spec");
        let mut spec = ContainerSpec::default();
        assert_eq!(
            container_spec("spec", Some(&spec)).unwrap_err().field,
            "spec.image"
        );
        spec.image = "busybox:1.36".into();
        assert!(container_spec("spec", Some(&spec)).is_ok());
        spec.cpu_limit = Some(f64::NAN);
        assert_eq!(
            container_spec("spec", Some(&spec)).unwrap_err().field,
            "spec.cpu_limit"
        );
        spec.cpu_limit = Some(1.5);
        spec.command = vec!["x".repeat(9000)];
        assert_eq!(
            container_spec("spec", Some(&spec)).unwrap_err().field,
            "spec.command[0]"
        );
    }

    #[test]
    fn names_and_page_sizes() {
        assert!(environment_name("name", "my-env-1").is_ok());
        assert!(environment_name("name", "My Env").is_err());
        assert!(environment_name("name", "").is_err());
        assert!(page_size("page_size", -1).is_err());
        assert!(page_size("page_size", 501).is_err());
        assert!(page_size("page_size", 0).is_ok());
    }
}
