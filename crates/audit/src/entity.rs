//! sea-orm entities of the audit log: `audit_events` (the chain) and
//! `audit_checkpoints` (signed heads). Rows are only ever inserted.

pub mod event {
    //! One chained event per row; `sequence` is assigned by the service.
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub sequence: i64,
        #[sea_orm(unique, indexed)]
        pub event_id: String,
        #[sea_orm(indexed)]
        pub time_ns: i64,
        #[sea_orm(indexed)]
        pub actor_user_id: String,
        pub actor_token_id: String,
        pub actor_service: String,
        /// Added after the first release (empty in older rows).
        #[sea_orm(default_value = "")]
        pub actor_kind: String,
        #[sea_orm(indexed)]
        pub team_id: String,
        #[sea_orm(indexed)]
        pub action: String,
        pub resource_type: String,
        pub resource_id: String,
        pub outcome: i32,
        pub severity: i32,
        #[sea_orm(column_type = "Text")]
        pub details: String,
        pub source_service: String,
        pub trace_id: String,
        pub request_id: String,
        pub client_address: String,
        pub hash: String,
        pub prev_hash: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod checkpoint {
    //! One signed checkpoint per row, keyed by the sequence it covers.
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_checkpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub sequence: i64,
        pub head_hash: String,
        pub time_ns: i64,
        pub key_id: String,
        pub signature: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
