//! IMAP endpoints: where a server is and how to reach it safely. How an account logs in
//! to one is [`super::login`]; the providers' servers are [`crate::providers`].

use std::path::PathBuf;
use std::time::Duration;

/// How the connection is protected. Implicit TLS is the default; STARTTLS, once chosen,
/// is mandatory; plaintext exists only when asked for by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    Tls,
    StartTls,
    Plain,
}

impl std::str::FromStr for Security {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tls" | "imaps" | "ssl" => Ok(Security::Tls),
            "starttls" => Ok(Security::StartTls),
            "plain" | "none" | "plaintext" => Ok(Security::Plain),
            other => Err(format!(
                "unknown security {other:?}: expected tls, starttls or plain"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub security: Security,
    /// Extra PEM CA certificates to trust besides the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate. Only ever set by an explicit per-endpoint choice.
    pub accept_invalid_certs: bool,
    pub connect_timeout: Duration,
    /// A server that sends nothing for this long while a command is open is dead.
    pub read_timeout: Duration,
    /// The longest a command may take, besides the time its bytes need at the floor
    /// rate (see `imap::client`): a server that answers one byte at a time, or floods a
    /// command with data it did not ask for, fails the command after this.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Duration,
    /// Connect only to public addresses (the API's `forbid_private_sources`). Checked on
    /// the addresses each connection resolves and then connects to, not once when the
    /// endpoint is made: a name can resolve to a public address then and to an internal
    /// one later (DNS rebinding).
    #[serde(default)]
    pub public_only: bool,
    /// At most this many connections to one account at this server, across every
    /// process (a provider's limit: Gmail refuses a 16th, the user's own phone
    /// included). The lower of this and `worker.connections_per_account` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// At most this many connections to this server, every account together (a
    /// tenant's own small server). The lower of this and `worker.connections_per_host`
    /// applies, on the source side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_host_connections: Option<u32>,
    /// Bytes of messages mailferry downloads from one account a UTC day at most (a
    /// provider's allowance: Gmail's is 2.5 GB); at it, the account pauses until the
    /// next day (see [`crate::domain::budget`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_download_bytes: Option<u64>,
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(600)
}

impl Endpoint {
    pub fn new(host: impl Into<String>, port: u16, security: Security) -> Self {
        Endpoint {
            host: host.into(),
            port,
            security,
            ca_file: None,
            accept_invalid_certs: false,
            connect_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(180),
            command_timeout: default_command_timeout(),
            public_only: false,
            max_connections: None,
            max_host_connections: None,
            daily_download_bytes: None,
        }
    }

    /// The connections a pool may open to one account: the installation's number, or
    /// the endpoint's own cap where that is lower.
    pub fn connection_cap(&self, installation: usize) -> usize {
        self.max_connections
            .map_or(installation, |own| installation.min(own as usize))
            .max(1)
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Whether `ip` is not a public unicast address: loopback, private, link-local,
/// carrier-grade NAT, benchmarking, documentation, IETF protocol assignments, reserved,
/// unspecified, broadcast, multicast, unique local, site-local, discard-only; and an
/// IPv4 address inside IPv6 (mapped, compatible, NAT64, 6to4) by the IPv4 address.
pub fn is_internal(ip: &std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr};
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10, CGNAT
                || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24, IETF assignments
                || (a == 192 && b == 0 && c == 2) // 192.0.2.0/24, documentation
                || (a == 198 && (18..20).contains(&b)) // 198.18.0.0/15, benchmarking
                || (a == 198 && b == 51 && c == 100) // documentation
                || (a == 203 && b == 0 && c == 113) // documentation
                || a >= 240 // 240.0.0.0/4, reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                is_internal(&IpAddr::V4(Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                )))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(&IpAddr::V4(v4));
            }
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return embedded(s[6], s[7]); // ::a.b.c.d, IPv4-compatible
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded(s[6], s[7]); // 64:ff9b::/96, NAT64
            }
            if s[0] == 0x2002 {
                return embedded(s[1], s[2]); // 2002::/16, 6to4
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7, unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10, link-local
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10, site-local
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // 64:ff9b:1::/48, local NAT64
                || (s[0] == 0x100 && s[1..4] == [0, 0, 0]) // 100::/64, discard
                || (s[0] == 0x2001 && s[1] == 0xdb8) // 2001:db8::/32, documentation
                || (s[0] == 0x2001 && s[1] < 0x200) // 2001::/23, IETF assignments (Teredo …)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.1",
            "198.51.100.7",
            "203.0.113.9",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::1",
            "100::1",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(is_internal(&internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "142.250.1.108",
            "2a00:1450:4001::6d",
            "100.128.0.1",
            "172.32.0.1",
            "198.20.0.1",
            "64:ff9b::8efa:16c",
            "2002:8efa:16c::1",
            "::ffff:142.250.1.108",
        ] {
            assert!(!is_internal(&public.parse().unwrap()), "{public}");
        }
    }
}
