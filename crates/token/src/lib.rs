//! Biscuit tokens: minting, offline attenuation and verification of VibeBox API tokens.
