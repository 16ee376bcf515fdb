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

/// Most labels an environment carries.
pub(crate) const MAX_LABELS: usize = 64;

/// Labels of an environment (`Environment.labels`): at most
/// [`MAX_LABELS`]; keys 1-63 characters of `[a-z0-9_.\/-]` starting with a
/// letter or digit; values at most 63 characters without control
/// characters. A violation names the label (`labels[KEY]`).
pub(crate) fn labels(field: &str, values: &std::collections::BTreeMap<String, String>) -> Result {
    if values.len() > MAX_LABELS {
        return Err(violation(
            field,
            format!("must have at most {MAX_LABELS} labels"),
        ));
    }
    for (key, value) in values {
        let first_ok = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = key.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '/' | '-')
        });
        if !(first_ok && rest_ok && key.len() <= 63) {
            return Err(violation(
                format!("{field}[{key:?}]"),
                "keys must be 1 to 63 lower-case letters, digits, '_', '.', '/' or '-', \
                 starting with a letter or digit",
            ));
        }
        if value.chars().count() > 63 || value.chars().any(char::is_control) {
            return Err(violation(
                format!("{field}[{key:?}]"),
                "values must be at most 63 characters without control characters",
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

/// The listing fields of a `ListEnvironments` request: the filter and
/// order_by parse (the violation says where and what was expected), and a
/// page token was issued for exactly this filter, order_by and
/// show_deleted (AIP-158).
pub(crate) fn listing(
    filter: &str,
    order_by: &str,
    show_deleted: bool,
    page_token: &str,
) -> Result {
    let to_violation = |e: vibebox_listing::InvalidArgument| violation(e.field, e.description);
    let query =
        vibebox_listing::Query::new(filter, order_by, show_deleted).map_err(to_violation)?;
    query.cursor(page_token).map_err(to_violation)?;
    Ok(())
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
    fn labels_follow_the_contract() {
        use std::collections::BTreeMap;
        let one = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        for key in ["ci", "a", "0", "team/app", "x.y_z-1", &"k".repeat(63)] {
            assert!(labels("labels", &one(key, "v")).is_ok(), "{key}");
        }
        for key in [
            "",
            "Ci",
            "-a",
            "_a",
            ".a",
            "/a",
            "a b",
            "a=b",
            "é",
            &"k".repeat(64),
        ] {
            let v = labels("labels", &one(key, "v")).unwrap_err();
            assert_eq!(v.field, format!("labels[{key:?}]"), "{key}");
        }
        assert!(labels("labels", &one("k", "")).is_ok());
        assert!(labels("labels", &one("k", &"v".repeat(63))).is_ok());
        // Characters, not bytes: 63 two-byte characters are fine.
        assert!(labels("labels", &one("k", &"é".repeat(63))).is_ok());
        for value in ["v".repeat(64), "a\nb".into(), "\0".into()] {
            let v = labels("environment.labels", &one("k", &value)).unwrap_err();
            assert_eq!(v.field, "environment.labels[\"k\"]");
        }
        let many: BTreeMap<String, String> =
            (0..64).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(labels("labels", &many).is_ok());
        let too_many: BTreeMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(labels("labels", &too_many).unwrap_err().field, "labels");
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

    #[test]
    fn listing_fields() {
        assert!(listing("", "", false, "").is_ok());
        assert!(listing("state = RUNNING AND labels:ci", "name desc", true, "").is_ok());
        let e = listing("state = RUNNING AND", "", false, "").unwrap_err();
        assert_eq!(e.field, "filter");
        assert!(
            e.description
                .starts_with("column 20: expected a comparison"),
            "{e}"
        );
        let e = listing("", "owner_id", false, "").unwrap_err();
        assert_eq!(e.field, "order_by");
        let e = listing("", "", false, "garbage").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.description.as_str()),
            ("page_token", "not a token from a previous page")
        );
    }
}
