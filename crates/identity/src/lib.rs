//! The identity service: users, teams, roles, biscuit tokens, revocation and authorization decisions.
