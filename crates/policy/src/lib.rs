//! The policy service: judges, hardens and signs every container spec.
