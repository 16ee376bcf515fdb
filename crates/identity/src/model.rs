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

/// A user account (without its password hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub platform_role: PlatformRole,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
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
    fn team_roles_are_ordered() {
        assert!(TeamRole::Admin > TeamRole::Developer && TeamRole::Developer > TeamRole::Viewer);
        for r in [TeamRole::Admin, TeamRole::Developer, TeamRole::Viewer] {
            assert_eq!(TeamRole::parse(r.as_str()), Some(r));
        }
    }
}
