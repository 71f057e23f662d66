//! The cluster processes' configuration.
//!
//! - `settings.rs`: one typed settings struct (defaults, a TOML file, the environment).
//! - `seal.rs`: credential sealing, secrets stored only as AEAD ciphertext bound to where they may be used.

pub mod seal;
pub mod settings;
