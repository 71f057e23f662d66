//! Modified UTF-7 (RFC 3501 section 5.1.3), the encoding of IMAP folder names.

use base64::alphabet::Alphabet;
use base64::engine::general_purpose::NO_PAD;
use base64::engine::GeneralPurpose;
use base64::Engine as _;

fn engine() -> GeneralPurpose {
    // The IMAP alphabet: standard base64 with ',' in place of '/'.
    let alphabet =
        Alphabet::new("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")
            .expect("valid alphabet");
    GeneralPurpose::new(&alphabet, NO_PAD)
}

pub fn encode(name: &str) -> String {
    let engine = engine();
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if !pending.is_empty() {
            let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&engine.encode(bytes));
            out.push('-');
            pending.clear();
        }
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut units = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut units));
        }
    }
    flush(&mut pending, &mut out);
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not valid modified UTF-7: {0:?}")]
pub struct DecodeError(pub String);

pub fn decode(wire: &[u8]) -> Result<String, DecodeError> {
    let err = || DecodeError(String::from_utf8_lossy(wire).into_owned());
    let engine = engine();
    let mut out = String::with_capacity(wire.len());
    let mut i = 0;
    while i < wire.len() {
        let b = wire[i];
        if b == b'&' {
            let end = wire[i + 1..]
                .iter()
                .position(|&c| c == b'-')
                .ok_or_else(err)?
                + i
                + 1;
            if end == i + 1 {
                out.push('&');
            } else {
                let bytes = engine.decode(&wire[i + 1..end]).map_err(|_| err())?;
                if bytes.len() % 2 != 0 {
                    return Err(err());
                }
                let units: Vec<u16> = bytes
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                out.push_str(&String::from_utf16(&units).map_err(|_| err())?);
            }
            i = end + 1;
        } else if (0x20..=0x7e).contains(&b) {
            out.push(b as char);
            i += 1;
        } else {
            return Err(err());
        }
    }
    Ok(out)
}

/// Decodes a wire name; a server that sends raw UTF-8 (or garbage) gets a lossy reading
/// rather than an error, since the name is still usable for display and mapping.
pub fn decode_lenient(wire: &[u8]) -> String {
    decode(wire).unwrap_or_else(|_| String::from_utf8_lossy(wire).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors_round_trip() {
        for (plain, wire) in [
            ("Entwürfe", "Entw&APw-rfe"),
            ("Входящие", "&BBIERQQ+BDQETwRJBDgENQ-"),
            ("受信箱", "&U9dP4Xux-"),
            ("Ärger & Co", "&AMQ-rger &- Co"),
            ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
            ("😀", "&2D3eAA-"),
        ] {
            assert_eq!(encode(plain), wire, "encoding {plain}");
            assert_eq!(decode(wire.as_bytes()).unwrap(), plain, "decoding {wire}");
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(decode(b"&Jjo").is_err());
        assert!(decode(b"&AM-").is_err());
        assert!(decode("caf\u{e9}".as_bytes()).is_err());
        assert_eq!(decode_lenient("café".as_bytes()), "café");
    }
}
