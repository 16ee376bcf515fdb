//! The role rules: given who the caller is (platform role, role in the
//! resource's team) and what they ask for, allow or deny with a reason.
//! Pure functions; the caller's current roles come fresh from the database.

use crate::model::{PlatformRole, TeamRole};

/// The resource an operation targets (domain copy of the authz proto's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resource {
    /// "platform", "team", "environment", "user", "token", "audit", "policy".
    pub kind: String,
    pub team_id: String,
    pub environment_id: String,
    /// Owner of the environment.
    pub owner_id: String,
    pub id: String,
}

/// Who is asking, as far as the rules care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    pub user_id: &'a str,
    pub platform_role: PlatformRole,
    /// Role in `resource.team_id`, if a member.
    pub team_role: Option<TeamRole>,
    /// Whether the user belongs to at least one team.
    pub member_of_any_team: bool,
    /// Whether the caller is a service account: it uses environments as
    /// its team role allows, but never manages identities (no users, teams,
    /// members, service accounts or tokens), whatever its role.
    pub service_account: bool,
}

/// Operations that manage identities: never allowed to a service account
/// (an automation's leaked token must not mint more tokens or principals).
pub const IDENTITY_MANAGEMENT: &[&str] = &[
    "identity.user.create",
    "identity.user.disable",
    "identity.team.create",
    "identity.member.add",
    "identity.member.set_role",
    "identity.member.remove",
    "identity.token.create",
    "identity.service_account.create",
    "identity.service_account.delete",
    "identity.service_account.token_create",
];

/// Allow or deny, with a short reason (returned to the gateway, audited).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(&'static str),
    Deny(String),
}

impl Decision {
    /// Whether the decision allows.
    pub fn allowed(&self) -> bool {
        matches!(self, Self::Allow(_))
    }
}

fn deny(reason: impl Into<String>) -> Decision {
    Decision::Deny(reason.into())
}

/// Every operation name the rules know (anything else is denied).
pub const OPERATIONS: &[&str] = &[
    "environment.create",
    "environment.get",
    "environment.list",
    "environment.start",
    "environment.stop",
    "environment.restart",
    "environment.delete",
    "environment.logs",
    "environment.exec",
    "environment.port_forward",
    "environment.stats",
    "environment.copy_to",
    "environment.copy_from",
    "environment.extend",
    "environment.update",
    "environment.wait",
    "environment.watch",
    "identity.whoami",
    "identity.user.create",
    "identity.user.list",
    "identity.user.disable",
    "identity.team.create",
    "identity.team.list",
    "identity.member.add",
    "identity.member.set_role",
    "identity.member.remove",
    "identity.member.list",
    "identity.token.create",
    "identity.token.revoke",
    "identity.token.list",
    "identity.service_account.create",
    "identity.service_account.list",
    "identity.service_account.delete",
    "identity.service_account.token_create",
    "audit.query",
    "audit.watch",
    "audit.verify",
    "audit.export",
    "policy.evaluate",
    "policy.get",
    "policy.reload",
];

/// Decides `operation` on `resource` for `subject`.
pub fn decide(operation: &str, subject: &Subject<'_>, resource: &Resource) -> Decision {
    let platform_admin = subject.platform_role == PlatformRole::Admin;
    let auditor = subject.platform_role == PlatformRole::Auditor;
    let role = subject.team_role;
    if subject.service_account && IDENTITY_MANAGEMENT.contains(&operation) {
        return deny("service accounts cannot manage identities or tokens");
    }
    let needs_team = || -> Option<Decision> {
        resource
            .team_id
            .is_empty()
            .then(|| deny("the resource's team is required"))
    };
    match operation {
        "environment.create" => {
            if let Some(d) = needs_team() {
                return d;
            }
            match role {
                Some(TeamRole::Admin | TeamRole::Developer) => Decision::Allow("team developer"),
                Some(TeamRole::Viewer) => deny("viewers cannot create environments"),
                None => deny("not a member of the team"),
            }
        }
        "environment.list" | "environment.watch" if resource.team_id.is_empty() => {
            Decision::Allow("scoped to the caller's teams")
        }
        "environment.get" | "environment.list" | "environment.watch" | "environment.wait"
        | "environment.logs" | "environment.stats" => {
            if let Some(d) = needs_team() {
                return d;
            }
            match role {
                Some(_) => Decision::Allow("team member"),
                None => deny("not a member of the team"),
            }
        }
        "environment.start"
        | "environment.stop"
        | "environment.restart"
        | "environment.exec"
        | "environment.copy_to"
        | "environment.copy_from"
        | "environment.port_forward"
        | "environment.extend"
        | "environment.update"
        | "environment.delete" => {
            if let Some(d) = needs_team() {
                return d;
            }
            let owner = !resource.owner_id.is_empty() && resource.owner_id == subject.user_id;
            match role {
                Some(TeamRole::Admin) => Decision::Allow("team admin"),
                Some(TeamRole::Developer) if owner => Decision::Allow("owner"),
                Some(TeamRole::Developer) => deny("only the owner or a team admin may do this"),
                Some(TeamRole::Viewer) => deny("viewers cannot change or exec into environments"),
                None => deny("not a member of the team"),
            }
        }
        "identity.whoami"
        | "identity.token.create"
        | "identity.token.revoke"
        | "identity.token.list"
        | "identity.team.list" => Decision::Allow("authenticated"),
        // Service accounts of a team: its admins (and platform admins);
        // listing them: any member.
        "identity.service_account.create"
        | "identity.service_account.delete"
        | "identity.service_account.token_create" => {
            if platform_admin {
                Decision::Allow("platform admin")
            } else if let Some(d) = needs_team() {
                d
            } else if role == Some(TeamRole::Admin) {
                Decision::Allow("team admin")
            } else {
                deny("team admins only")
            }
        }
        "identity.service_account.list" => {
            if platform_admin {
                Decision::Allow("platform admin")
            } else if let Some(d) = needs_team() {
                d
            } else if role.is_some() {
                Decision::Allow("team member")
            } else {
                deny("not a member of the team")
            }
        }
        "identity.user.create"
        | "identity.user.list"
        | "identity.user.disable"
        | "identity.team.create" => {
            if platform_admin {
                Decision::Allow("platform admin")
            } else {
                deny("platform admins only")
            }
        }
        "identity.member.add" | "identity.member.set_role" | "identity.member.remove" => {
            if platform_admin {
                Decision::Allow("platform admin")
            } else if role == Some(TeamRole::Admin) {
                Decision::Allow("team admin")
            } else {
                deny("team admins only")
            }
        }
        "identity.member.list" => {
            if platform_admin {
                Decision::Allow("platform admin")
            } else if role.is_some() {
                Decision::Allow("team member")
            } else {
                deny("not a member of the team")
            }
        }
        "audit.query" | "audit.watch" | "audit.verify" | "audit.export" => {
            if platform_admin || auditor {
                Decision::Allow("platform audit access")
            } else if matches!(operation, "audit.query" | "audit.watch")
                && !resource.team_id.is_empty()
                && role == Some(TeamRole::Admin)
            {
                Decision::Allow("team-scoped")
            } else {
                deny("platform admins and auditors only (team admins: their team's events)")
            }
        }
        // A dry run for a named team is that team's business (it may be
        // judged by the team's own rules): its members only.
        "policy.evaluate" if !resource.team_id.is_empty() => {
            if platform_admin || auditor {
                Decision::Allow("platform access")
            } else if role.is_some() {
                Decision::Allow("team member")
            } else {
                deny("not a member of the team")
            }
        }
        "policy.evaluate" | "policy.get" => {
            if platform_admin || auditor || subject.member_of_any_team {
                Decision::Allow("member")
            } else {
                deny("members only")
            }
        }
        "policy.reload" => {
            if platform_admin {
                Decision::Allow("platform admin")
            } else {
                deny("platform admins only")
            }
        }
        _ => deny(format!("unknown operation {operation:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(owner: &str) -> Resource {
        Resource {
            kind: "environment".into(),
            team_id: "t".into(),
            environment_id: "e".into(),
            owner_id: owner.into(),
            id: String::new(),
        }
    }

    fn subject(role: Option<TeamRole>) -> Subject<'static> {
        Subject {
            user_id: "me",
            platform_role: PlatformRole::None,
            team_role: role,
            member_of_any_team: role.is_some(),
            service_account: false,
        }
    }

    #[test]
    fn owner_needs_to_still_be_a_developer() {
        let d = decide(
            "environment.exec",
            &subject(Some(TeamRole::Viewer)),
            &env("me"),
        );
        assert!(!d.allowed());
        let d = decide(
            "environment.exec",
            &subject(Some(TeamRole::Developer)),
            &env("me"),
        );
        assert!(d.allowed());
        let d = decide(
            "environment.exec",
            &subject(Some(TeamRole::Developer)),
            &env("other"),
        );
        assert!(!d.allowed());
        let d = decide(
            "environment.delete",
            &subject(Some(TeamRole::Admin)),
            &env("other"),
        );
        assert!(d.allowed());
    }

    #[test]
    fn copying_files_is_for_the_owner_or_a_team_admin_like_exec() {
        for op in ["environment.copy_to", "environment.copy_from"] {
            let allowed = |role, owner| decide(op, &subject(role), &env(owner)).allowed();
            assert!(allowed(Some(TeamRole::Developer), "me"), "{op}: owner");
            assert!(allowed(Some(TeamRole::Admin), "other"), "{op}: team admin");
            assert!(
                !allowed(Some(TeamRole::Developer), "other"),
                "{op}: not owner"
            );
            assert!(!allowed(Some(TeamRole::Viewer), "me"), "{op}: viewer");
            assert!(!allowed(None, "me"), "{op}: other team");
        }
    }

    #[test]
    fn extending_is_for_the_owner_or_a_team_admin_like_stop() {
        let allowed =
            |role, owner| decide("environment.extend", &subject(role), &env(owner)).allowed();
        assert!(allowed(Some(TeamRole::Developer), "me"), "owner");
        assert!(allowed(Some(TeamRole::Admin), "other"), "team admin");
        assert!(!allowed(Some(TeamRole::Developer), "other"), "not owner");
        assert!(!allowed(Some(TeamRole::Viewer), "me"), "viewer");
        assert!(!allowed(None, "me"), "other team");
    }

    #[test]
    fn a_dry_run_for_a_team_is_for_its_members() {
        // A member of some other team: no team named is fine, this one not.
        let outsider = Subject {
            member_of_any_team: true,
            ..subject(None)
        };
        let team = Resource {
            kind: "policy".into(),
            team_id: "t".into(),
            ..Default::default()
        };
        assert!(!decide("policy.evaluate", &outsider, &team).allowed());
        assert!(decide("policy.evaluate", &outsider, &Resource::default()).allowed());
        let member = subject(Some(TeamRole::Viewer));
        assert!(decide("policy.evaluate", &member, &team).allowed());
        // Nobody's member: nothing.
        assert!(!decide("policy.evaluate", &subject(None), &Resource::default()).allowed());
    }

    #[test]
    fn unknown_operations_and_missing_team_are_denied() {
        assert!(
            !decide(
                "environment.explode",
                &subject(Some(TeamRole::Admin)),
                &env("me")
            )
            .allowed()
        );
        let mut r = env("me");
        r.team_id.clear();
        assert!(!decide("environment.get", &subject(Some(TeamRole::Admin)), &r).allowed());
    }

    #[test]
    fn every_listed_operation_has_a_rule() {
        let admin = Subject {
            user_id: "me",
            platform_role: PlatformRole::Admin,
            team_role: Some(TeamRole::Admin),
            member_of_any_team: true,
            service_account: false,
        };
        for op in OPERATIONS {
            assert!(decide(op, &admin, &env("me")).allowed(), "{op}");
        }
    }

    #[test]
    fn service_accounts_use_environments_by_role_but_never_manage_identities() {
        let sa = |role| Subject {
            service_account: true,
            ..subject(Some(role))
        };
        let team = Resource {
            kind: "team".into(),
            team_id: "t".into(),
            ..Default::default()
        };
        assert!(decide("environment.create", &sa(TeamRole::Developer), &env("x")).allowed());
        assert!(decide("environment.delete", &sa(TeamRole::Admin), &env("x")).allowed());
        assert!(!decide("environment.create", &sa(TeamRole::Viewer), &env("x")).allowed());
        for op in IDENTITY_MANAGEMENT {
            assert!(OPERATIONS.contains(op), "{op}");
            assert!(!decide(op, &sa(TeamRole::Admin), &team).allowed(), "{op}");
            // The same role as a person is allowed where the role allows.
            let person = subject(Some(TeamRole::Admin));
            if op.starts_with("identity.member") || op.starts_with("identity.service_account") {
                assert!(decide(op, &person, &team).allowed(), "{op}");
            }
        }
        for op in [
            "identity.whoami",
            "identity.token.list",
            "identity.token.revoke",
            "identity.service_account.list",
            "identity.member.list",
        ] {
            assert!(decide(op, &sa(TeamRole::Viewer), &team).allowed(), "{op}");
        }
    }
}
