//! sea-orm entities of the identity database: users (people and service
//! accounts), teams, memberships, issued tokens, idempotency keys and the
//! public halves of the token signing keys.
//!
//! Ids are UUID text, roles are stored as short strings and times as
//! timestamps with time zone, so the same schema works on SQLite and
//! PostgreSQL.

pub mod user {
    //! A user account.
    use sea_orm::entity::prelude::*;

    /// A row of `users`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(unique)]
        pub username: String,
        pub display_name: String,
        /// Argon2id PHC string.
        pub password_hash: String,
        /// "none", "admin" or "auditor".
        pub platform_role: String,
        pub disabled: bool,
        pub created_at: DateTimeUtc,
        /// "human" or "service_account".
        #[sea_orm(default_value = "human")]
        pub kind: String,
        /// A service account's one team.
        pub team_id: Option<String>,
        /// Set when a service account was deleted (disabled for good).
        pub deleted_at: Option<DateTimeUtc>,
        /// Who created a service account.
        pub created_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod team {
    //! A team: the unit that owns environments.
    use sea_orm::entity::prelude::*;

    /// A row of `teams`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "teams")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(unique)]
        pub name: String,
        pub display_name: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod membership {
    //! A user's role in a team.
    use sea_orm::entity::prelude::*;

    /// A row of `memberships`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "memberships")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub team_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: String,
        /// "admin", "developer" or "viewer".
        pub role: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod token {
    //! An issued token (session or API). Its biscuit is never stored.
    use sea_orm::entity::prelude::*;

    /// A row of `tokens`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tokens")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub user_id: String,
        /// The token that was used to create this one; revoking a parent
        /// revokes its descendants.
        pub parent_id: Option<String>,
        /// "session" or "api".
        pub kind: String,
        pub description: String,
        pub created_at: DateTimeUtc,
        pub expires_at: DateTimeUtc,
        pub revoked_at: Option<DateTimeUtc>,
        /// The owning team of a service account's token.
        pub team_id: Option<String>,
        /// Who issued it (a team admin for a service account's token).
        pub created_by: Option<String>,
        /// `Restrictions::encode` of what the token is restricted to.
        #[sea_orm(default_value = "")]
        pub restrictions: String,
        /// Last authorization decision or scope lookup for it (updated at
        /// most once a minute).
        pub last_used_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod token_key {
    //! The public half of a token signing key; the private half lives in
    //! `<data-dir>/keys/`.
    use sea_orm::entity::prelude::*;

    /// A row of `token_keys`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "token_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub key_id: i64,
        /// Hex Ed25519 public key.
        pub public_key: String,
        pub created_at: DateTimeUtc,
        /// Set when retired: tokens signed by it stop verifying.
        pub retired_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod idempotency {
    //! What a create with a `request_id` made, so that a retry with the same
    //! key gets the same answer (kept for a day).
    use sea_orm::entity::prelude::*;

    /// A row of `idempotency_keys`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "idempotency_keys")]
    pub struct Model {
        /// The caller's user id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub caller_id: String,
        /// "user.create", "team.create", "service_account.create",
        /// "token.create" or "service_account.token_create".
        #[sea_orm(primary_key, auto_increment = false)]
        pub operation: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        /// SHA-256 (hex) of the request's fields (never a secret).
        pub fingerprint: String,
        /// What it made (for tokens: the one valid token of this key).
        pub resource_id: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
