//! The end-to-end test harness: real IMAP servers on loopback ([`dovecot`]), test
//! certificates ([`tls`]), a corpus with the hard cases and a verifier ([`mail`]), a TCP
//! proxy that cuts connections ([`proxy`]), a relay that plays a hostile server ([`hostile`]), an OAuth2 token endpoint ([`oauth`]), the real binary ([`run`]) and a cluster
//! served through its HTTP API ([`api`]).

pub mod api;
pub mod cyrus;
pub mod dovecot;
pub mod hostile;
pub mod mail;
pub mod oauth;
pub mod proxy;
pub mod redis;
pub mod run;
pub mod tls;
pub mod tls_proxy;
