//! Schema migrations (sea-orm-migration), run on every start. Portable:
//! only types both SQLite and PostgreSQL understand.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, boolean, string, string_null, string_uniq, timestamp_with_time_zone,
    timestamp_with_time_zone_null,
};

/// The identity service's migrator.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(Initial), Box::new(ServiceAccounts)]
    }
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Username,
    DisplayName,
    PasswordHash,
    PlatformRole,
    Disabled,
    CreatedAt,
    Kind,
    TeamId,
    DeletedAt,
    CreatedBy,
}

#[derive(DeriveIden)]
enum Teams {
    Table,
    Id,
    Name,
    DisplayName,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Memberships {
    Table,
    TeamId,
    UserId,
    Role,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Tokens {
    Table,
    Id,
    UserId,
    ParentId,
    Kind,
    Description,
    CreatedAt,
    ExpiresAt,
    RevokedAt,
    TeamId,
    CreatedBy,
    Restrictions,
    LastUsedAt,
}

#[derive(DeriveIden)]
enum IdempotencyKeys {
    Table,
    CallerId,
    Operation,
    RequestId,
    Fingerprint,
    ResourceId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum TokenKeys {
    Table,
    KeyId,
    PublicKey,
    CreatedAt,
    RetiredAt,
}

struct Initial;

impl MigrationName for Initial {
    fn name(&self) -> &str {
        "m20261128_000001_identity_initial"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .col(string(Users::Id).primary_key())
                    .col(string_uniq(Users::Username))
                    .col(string(Users::DisplayName))
                    .col(string(Users::PasswordHash))
                    .col(string(Users::PlatformRole))
                    .col(boolean(Users::Disabled))
                    .col(timestamp_with_time_zone(Users::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Teams::Table)
                    .col(string(Teams::Id).primary_key())
                    .col(string_uniq(Teams::Name))
                    .col(string(Teams::DisplayName))
                    .col(timestamp_with_time_zone(Teams::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Memberships::Table)
                    .col(string(Memberships::TeamId))
                    .col(string(Memberships::UserId))
                    .col(string(Memberships::Role))
                    .col(timestamp_with_time_zone(Memberships::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(Memberships::TeamId)
                            .col(Memberships::UserId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(Memberships::Table, Memberships::TeamId)
                            .to(Teams::Table, Teams::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(Memberships::Table, Memberships::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_memberships_user")
                    .table(Memberships::Table)
                    .col(Memberships::UserId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Tokens::Table)
                    .col(string(Tokens::Id).primary_key())
                    .col(string(Tokens::UserId))
                    .col(string_null(Tokens::ParentId))
                    .col(string(Tokens::Kind))
                    .col(string(Tokens::Description))
                    .col(timestamp_with_time_zone(Tokens::CreatedAt))
                    .col(timestamp_with_time_zone(Tokens::ExpiresAt))
                    .col(timestamp_with_time_zone_null(Tokens::RevokedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Tokens::Table, Tokens::UserId)
                            .to(Users::Table, Users::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_tokens_parent")
                    .table(Tokens::Table)
                    .col(Tokens::ParentId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TokenKeys::Table)
                    .col(big_integer(TokenKeys::KeyId).primary_key())
                    .col(string(TokenKeys::PublicKey))
                    .col(timestamp_with_time_zone(TokenKeys::CreatedAt))
                    .col(timestamp_with_time_zone_null(TokenKeys::RetiredAt))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Service accounts (users of kind `service_account` with one team), the
/// token registry's columns (team, issuer, restrictions, last use) and the
/// idempotency keys of creates.
struct ServiceAccounts;

impl MigrationName for ServiceAccounts {
    fn name(&self) -> &str {
        "m20261210_000002_identity_service_accounts"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ServiceAccounts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        let users: [ColumnDef; 4] = [
            string(Users::Kind).default("human").to_owned(),
            string_null(Users::TeamId),
            timestamp_with_time_zone_null(Users::DeletedAt),
            string_null(Users::CreatedBy),
        ];
        for mut column in users {
            manager
                .alter_table(
                    Table::alter()
                        .table(Users::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        let tokens: [ColumnDef; 4] = [
            string_null(Tokens::TeamId),
            string_null(Tokens::CreatedBy),
            string(Tokens::Restrictions).default("").to_owned(),
            timestamp_with_time_zone_null(Tokens::LastUsedAt),
        ];
        for mut column in tokens {
            manager
                .alter_table(
                    Table::alter()
                        .table(Tokens::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        for (name, table, column) in [
            (
                "idx_users_team",
                Users::Table.into_iden(),
                Users::TeamId.into_iden(),
            ),
            (
                "idx_tokens_user",
                Tokens::Table.into_iden(),
                Tokens::UserId.into_iden(),
            ),
            (
                "idx_tokens_team",
                Tokens::Table.into_iden(),
                Tokens::TeamId.into_iden(),
            ),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(table)
                        .col(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(IdempotencyKeys::Table)
                    .col(string(IdempotencyKeys::CallerId))
                    .col(string(IdempotencyKeys::Operation))
                    .col(string(IdempotencyKeys::RequestId))
                    .col(string(IdempotencyKeys::Fingerprint))
                    .col(string(IdempotencyKeys::ResourceId))
                    .col(timestamp_with_time_zone(IdempotencyKeys::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(IdempotencyKeys::CallerId)
                            .col(IdempotencyKeys::Operation)
                            .col(IdempotencyKeys::RequestId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_idempotency_created")
                    .table(IdempotencyKeys::Table)
                    .col(IdempotencyKeys::CreatedAt)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::ConnectionTrait;

    use super::*;
    use crate::model::{PrincipalKind, Restrictions};
    use crate::store;

    /// A database made before service accounts keeps its users and tokens:
    /// people of kind `human`, tokens without restrictions or last use.
    #[tokio::test]
    async fn an_older_database_upgrades_in_place_on_every_database() {
        for test_db in vibebox_db::testing::databases().await {
            let db = test_db.connect().await;
            Migrator::up(&db, Some(1)).await.unwrap();
            let now = chrono::Utc::now();
            let user = Query::insert()
                .into_table(Users::Table)
                .columns([
                    Users::Id,
                    Users::Username,
                    Users::DisplayName,
                    Users::PasswordHash,
                    Users::PlatformRole,
                    Users::Disabled,
                    Users::CreatedAt,
                ])
                .values_panic([
                    "u-old".into(),
                    "old-user".into(),
                    "Old".into(),
                    "hash".into(),
                    "none".into(),
                    false.into(),
                    now.into(),
                ])
                .to_owned();
            db.execute(&user).await.unwrap();
            let token = Query::insert()
                .into_table(Tokens::Table)
                .columns([
                    Tokens::Id,
                    Tokens::UserId,
                    Tokens::Kind,
                    Tokens::Description,
                    Tokens::CreatedAt,
                    Tokens::ExpiresAt,
                ])
                .values_panic([
                    "t-old".into(),
                    "u-old".into(),
                    "api".into(),
                    "from before".into(),
                    now.into(),
                    (now + chrono::Duration::days(1)).into(),
                ])
                .to_owned();
            db.execute(&token).await.unwrap();
            Migrator::up(&db, None).await.unwrap();
            let user = store::user_by_id(&db, "u-old").await.unwrap().unwrap();
            assert_eq!(
                (user.kind, user.team_id.as_str(), user.deleted_at),
                (PrincipalKind::Human, "", None),
                "{:?}",
                test_db.kind
            );
            let listed = store::list_api_tokens(&db, &store::TokenFilter::default(), now, 0, 10)
                .await
                .unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].restrictions, Restrictions::default());
            assert_eq!(listed[0].last_used_at, None);
            assert_eq!(listed[0].description, "from before");
        }
    }
}
