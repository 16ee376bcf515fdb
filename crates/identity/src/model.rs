//! Domain types of the identity service: roles, users, teams, memberships
//! and the validation rules of names and passwords. No wire or database
//! types here.

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

/// A user's platform-wide role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlatformRole {
    /// An ordinary user: rights come from team memberships only.
    None,
    /// Manages users and teams, changes policies, reads the audit log.
    Admin,
    /// Reads the audit log.
    Auditor,
}

impl PlatformRole {
    /// Database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Admin => "admin",
            Self::Auditor => "auditor",
        }
    }
    /// Parses the database spelling (unknown values are no role: fail safe).
    pub fn parse(s: &str) -> Self {
        match s {
            "admin" => Self::Admin,
            "auditor" => Self::Auditor,
            _ => Self::None,
        }
    }
}

/// A member's role in a team: admin > developer > viewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TeamRole {
    /// Reads environments of the team.
    Viewer,
    /// Creates and uses their own environments.
    Developer,
    /// Manages the team and every environment of it.
    Admin,
}

impl TeamRole {
    /// Database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Developer => "developer",
            Self::Admin => "admin",
        }
    }
    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "developer" => Some(Self::Developer),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// Whether a principal is a person or a service account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// A person: logs in with a password, may belong to many teams.
    Human,
    /// A non-human principal of exactly one team: holds API tokens only,
    /// never logs in, never manages identities.
    ServiceAccount,
}

impl PrincipalKind {
    /// Database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::ServiceAccount => "service_account",
        }
    }
    /// Parses the database spelling (unknown values are service accounts:
    /// fail safe, the kind with fewer rights).
    pub fn parse(s: &str) -> Self {
        match s {
            "human" => Self::Human,
            _ => Self::ServiceAccount,
        }
    }
    /// The `Actor.kind` audit events carry for this principal.
    pub fn actor_kind(self) -> &'static str {
        match self {
            Self::Human => vibebox_audit_client::actor_kind::USER,
            Self::ServiceAccount => vibebox_audit_client::actor_kind::SERVICE_ACCOUNT,
        }
    }
}

/// A user account or service account (without its password hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub platform_role: PlatformRole,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub kind: PrincipalKind,
    /// A service account's one team (empty for people).
    pub team_id: String,
    /// When a service account was deleted (disabled for good).
    pub deleted_at: Option<DateTime<Utc>>,
}

impl User {
    /// Whether this is a service account.
    pub fn is_service_account(&self) -> bool {
        self.kind == PrincipalKind::ServiceAccount
    }
}

/// A service account as listed: the principal and its role in its team.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub user: User,
    /// Its role in its team (`None` only if the membership row is gone).
    pub role: Option<TeamRole>,
}

/// Limits baked into a token at issue; empty lists mean no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restrictions {
    pub team_ids: Vec<String>,
    pub operations: Vec<String>,
    pub environment_ids: Vec<String>,
}

impl Restrictions {
    /// Whether nothing is restricted.
    pub fn is_empty(&self) -> bool {
        self.team_ids.is_empty() && self.operations.is_empty() && self.environment_ids.is_empty()
    }

    /// Checks and normalizes (sorted, duplicates dropped): at most
    /// [`MAX_RESTRICTION_VALUES`] values per list, ids of at most 64
    /// characters of `[A-Za-z0-9._:-]`, operations the role rules know.
    pub fn validated(mut self) -> Result<Self> {
        for (field, values) in [
            ("restrictions.team_ids", &mut self.team_ids),
            ("restrictions.operations", &mut self.operations),
            ("restrictions.environment_ids", &mut self.environment_ids),
        ] {
            values.sort();
            values.dedup();
            if values.len() > MAX_RESTRICTION_VALUES {
                return Err(Error::invalid(field, "at most 16 values"));
            }
            for value in values.iter() {
                let ok = !value.is_empty()
                    && value.len() <= 64
                    && value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
                if !ok {
                    return Err(Error::invalid(
                        field,
                        "each value 1 to 64 characters: letters, digits, '.', '_', ':' and '-'",
                    ));
                }
            }
        }
        if let Some(op) = self
            .operations
            .iter()
            .find(|op| !crate::rbac::OPERATIONS.contains(&op.as_str()))
        {
            return Err(Error::invalid(
                "restrictions.operations",
                format!("unknown operation {op:?}"),
            ));
        }
        Ok(self)
    }

    /// The token crate's form.
    pub fn scope(&self) -> vibebox_token::Scope {
        vibebox_token::Scope {
            teams: self.team_ids.clone(),
            environments: self.environment_ids.clone(),
            operations: self.operations.clone(),
        }
    }

    /// Storage spelling: one line per list, `team_ids=a,b`. Values never
    /// hold ',', '=' or a newline (see [`Restrictions::validated`]).
    pub fn encode(&self) -> String {
        if self.is_empty() {
            return String::new();
        }
        format!(
            "team_ids={}\noperations={}\nenvironment_ids={}",
            self.team_ids.join(","),
            self.operations.join(","),
            self.environment_ids.join(",")
        )
    }

    /// Parses [`Restrictions::encode`]'s spelling.
    pub fn decode(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let Some((key, values)) = line.split_once('=') else {
                continue;
            };
            let values: Vec<String> = values
                .split(',')
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect();
            match key {
                "team_ids" => out.team_ids = values,
                "operations" => out.operations = values,
                "environment_ids" => out.environment_ids = values,
                _ => {}
            }
        }
        out
    }
}

/// Most values in one list of [`Restrictions`].
pub const MAX_RESTRICTION_VALUES: usize = vibebox_token::MAX_SCOPE_VALUES;

/// An issued API token as listed (never its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub owner_id: String,
    pub owner_kind: PrincipalKind,
    pub owner_name: String,
    /// The owning team of a service account's token (empty otherwise).
    pub team_id: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub restrictions: Restrictions,
    pub revoked: bool,
    /// The principal that issued it (for a service account's token: the
    /// admin who minted it; empty for the bootstrap token).
    pub created_by: String,
}

/// A team.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
}

/// A membership, with the team name and username for display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub team_id: String,
    pub user_id: String,
    pub role: TeamRole,
    pub team_name: String,
    pub username: String,
}

/// A freshly issued token.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The biscuit (base64). Secret: never log.
    pub token: String,
    pub token_id: String,
    pub expires_at: DateTime<Utc>,
}

/// Checks a username or team name: 3 to 32 characters, lower-case letters,
/// digits, '.', '_' and '-', starting with a letter.
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    let ok_len = (3..=32).contains(&name.len());
    let ok_first = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "3 to 32 characters: lower-case letters, digits, '.', '_' and '-', starting with a letter",
        ))
    }
}

/// Checks a display name: at most 128 characters, no control characters.
pub fn validate_display_name(field: &'static str, name: &str) -> Result<()> {
    if name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            "at most 128 characters, no control characters",
        ));
    }
    Ok(())
}

/// Checks a new password: 12 to 1024 characters.
pub fn validate_password(password: &str) -> Result<()> {
    let n = password.chars().count();
    if !(12..=1024).contains(&n) {
        return Err(Error::invalid("password", "12 to 1024 characters"));
    }
    Ok(())
}

/// Checks that an id field is present and plausibly an id.
pub fn validate_id(field: &'static str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 {
        return Err(Error::invalid(field, "required, at most 64 characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in [
            "abc",
            "alice",
            "a.b_c-1",
            "a2345678901234567890123456789012",
        ] {
            validate_name("username", good).unwrap();
        }
        for bad in [
            "ab",
            "Alice",
            "1abc",
            "-abc",
            "a b c",
            "a23456789012345678901234567890123",
            "ali€e",
            "",
        ] {
            assert!(validate_name("username", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords() {
        assert!(validate_password("short").is_err());
        validate_password("correct horse battery").unwrap();
    }

    #[test]
    fn restrictions_are_bounded_checked_and_round_trip() {
        let r = Restrictions {
            team_ids: vec!["t2".into(), "t1".into(), "t1".into()],
            operations: vec!["environment.get".into()],
            environment_ids: vec![],
        }
        .validated()
        .unwrap();
        assert_eq!(r.team_ids, ["t1", "t2"], "sorted, duplicates dropped");
        assert_eq!(Restrictions::decode(&r.encode()), r);
        assert_eq!(Restrictions::decode(""), Restrictions::default());
        assert_eq!(Restrictions::default().encode(), "");
        let too_many = Restrictions {
            team_ids: (0..17).map(|i| format!("t{i}")).collect(),
            ..Restrictions::default()
        };
        assert!(too_many.validated().is_err());
        for bad in ["a,b", "a=b", "a\nb", "", &"x".repeat(65)] {
            let r = Restrictions {
                environment_ids: vec![bad.to_owned()],
                ..Restrictions::default()
            };
            assert!(r.validated().is_err(), "{bad:?}");
        }
        let unknown = Restrictions {
            operations: vec!["environment.explode".into()],
            ..Restrictions::default()
        };
        assert!(unknown.validated().is_err());
    }

    #[test]
    fn unknown_principal_kinds_read_as_service_accounts() {
        assert_eq!(PrincipalKind::parse("human"), PrincipalKind::Human);
        assert_eq!(PrincipalKind::parse("robot"), PrincipalKind::ServiceAccount);
        for k in [PrincipalKind::Human, PrincipalKind::ServiceAccount] {
            assert_eq!(PrincipalKind::parse(k.as_str()), k);
        }
    }

    #[test]
    fn team_roles_are_ordered() {
        assert!(TeamRole::Admin > TeamRole::Developer && TeamRole::Developer > TeamRole::Viewer);
        for r in [TeamRole::Admin, TeamRole::Developer, TeamRole::Viewer] {
            assert_eq!(TeamRole::parse(r.as_str()), Some(r));
        }
    }
}
