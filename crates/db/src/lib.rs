//! Database connections for VibeBox services: SQLite (WAL, busy timeout) by default, PostgreSQL in production.
