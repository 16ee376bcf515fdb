//! Policy clearances: the canonical spec digest, signing and verification bound to exactly one hardened spec.
