//! One bootstrap for every VibeBox gRPC server and client: config, telemetry, mTLS identities, health, reflection, load shedding.
