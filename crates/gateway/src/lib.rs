//! The gateway: the only public entry; authenticates, authorizes, clears and audits every call.
