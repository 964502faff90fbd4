//! Configuration file: serde structs with defaults, validation errors that name the key.
