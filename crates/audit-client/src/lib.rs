//! The producers' audit client: a durable local outbox delivered in order, exactly once, to the audit service.
