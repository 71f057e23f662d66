//! The IMAP session layer: a sans-I/O parser ([`parse`]), a pipelining tokio client
//! ([`client`]), message flags that are safe to send on ([`flag`]), mailbox operations ([`mailbox`]), a message's FETCH data and identity ([`message`]), TLS ([`tls`]) and a per-account
//! connection pool with a cap ([`pool`]).

pub mod client;
pub mod flag;
pub mod mailbox;
pub mod message;
pub mod parse;
pub mod pool;
pub mod tls;
pub mod uidset;

pub use client::{connect, Capabilities, Command, CommandHandle, Limits, Session};
pub use flag::Flag;
