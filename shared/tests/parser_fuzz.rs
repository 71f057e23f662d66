//! A property-based fuzzer over the response framer and parser: every byte a server
//! sends is untrusted (DESIGN.md invariant 10).
//!
//! Inputs are mutations of the seed corpus in `parser-seeds/` (real responses and hostile
//! ones): bit flips, inserted and deleted bytes, IMAP's structural tokens (`(`, `{n}`,
//! CRLF, quotes, `[`), spliced seeds, repeated pieces, truncation. Each input is framed
//! twice, once whole and once in random chunks (as reads deliver it), and must:
//! - never panic (in the framer or the parser);
//! - give the same frames and the same error either way;
//! - give frames that are exactly the consumed input, in order, none larger than
//!   `max_line + max_literal`.
//!
//! It runs for `MAILFERRY_FUZZ_SECS` seconds (default 10; CI runs the default) and
//! prints the seed of its run; `MAILFERRY_FUZZ_SEED` replays one. A failing input is
//! written to the temporary directory and named in the failure: add it to the seeds
//! and a unit test beside the parser's.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mailferry_shared::imap::parse::{parse_response, Framer, ParseError};

const MAX_LINE: usize = 4096;
const MAX_LITERAL: u64 = 4096;

fn seeds() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parser-seeds");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("the seed corpus")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("a seed"))
        .collect();
    out.sort();
    assert!(out.len() >= 10, "the seed corpus is missing");
    out
}

const TOKENS: &[&[u8]] = &[
    b"(",
    b")",
    b"((((",
    b"))))",
    b"{0}\r\n",
    b"{5}\r\n",
    b"{70000}\r\n",
    b"~{3}\r\n",
    b"{4+}\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"\"",
    b"\\",
    b"[",
    b"]",
    b" ",
    b"NIL",
    b"* ",
    b"+ ",
    b"m1 OK ",
    b"* 1 FETCH (",
    b"BODY[] ",
    b"UID 4294967296",
    b"\0",
    b"\xff",
];

fn mutate(rng: &mut fastrand::Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.usize(..seeds.len())].clone();
    for _ in 0..rng.usize(1..8) {
        let at = rng.usize(..=v.len());
        match rng.u8(..9) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
            }
            1 if !v.is_empty() => {
                let end = (at + rng.usize(1..16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            2 => {
                let t = TOKENS[rng.usize(..TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            3 => {
                let other = &seeds[rng.usize(..seeds.len())];
                let from = rng.usize(..=other.len());
                v.splice(at..at, other[from..].iter().copied());
            }
            4 if !v.is_empty() => {
                // a piece repeated: deep nesting, long lines, many literals
                let start = rng.usize(..v.len());
                let end = (start + rng.usize(1..8)).min(v.len());
                let piece = v[start..end].to_vec();
                for _ in 0..rng.usize(1..2000) {
                    v.splice(at..at, piece.iter().copied());
                }
            }
            5 => v.truncate(at),
            6 => v.insert(at, rng.u8(..)),
            7 => {
                // a token repeated: endless literals, nesting, empty lines
                let t = TOKENS[rng.usize(..TOKENS.len())];
                let times = rng.usize(1..3000);
                v.splice(at..at, t.iter().copied().cycle().take(t.len() * times));
            }
            _ => {
                let digits = rng.u64(..u64::MAX).to_string();
                v.splice(at..at, digits.into_bytes());
            }
        }
    }
    v
}

/// What framing (and parsing each frame) made of an input: the frames, and how it ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Vec<u8>>,
    end: Option<ParseError>,
}

fn frame_all(input: &[u8], chunks: &[usize]) -> Outcome {
    let mut framer = Framer::new(MAX_LINE, MAX_LITERAL);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut sizes = chunks.iter().copied().cycle();
    while fed < input.len() {
        let n = sizes
            .next()
            .unwrap_or(input.len())
            .clamp(1, input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            match framer.next_frame(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(
                        frame.len() as u64 <= MAX_LINE as u64 + MAX_LITERAL,
                        "a frame of {} bytes",
                        frame.len()
                    );
                    // Parsing may fail (that is a named error), never panic.
                    let _ = parse_response(frame.clone());
                    frames.push(frame.to_vec());
                }
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        end: Some(e),
                    }
                }
            }
        }
    }
    Outcome { frames, end: None }
}

fn check(input: &[u8], rng: &mut fastrand::Rng) {
    let whole = frame_all(input, &[input.len().max(1)]);
    let chunks: Vec<usize> = (0..8).map(|_| rng.usize(1..64)).collect();
    let pieces = frame_all(input, &chunks);
    assert_eq!(whole.frames, pieces.frames, "chunking changed the frames");
    // An error may come earlier with fewer bytes (a line already too long), never a
    // different one for the same bytes.
    if whole.end.is_some() || pieces.end.is_some() {
        assert_eq!(
            std::mem::discriminant(&whole.end),
            std::mem::discriminant(&pieces.end),
            "chunking changed how it ended: {:?} / {:?}",
            whole.end,
            pieces.end
        );
    }
    let consumed: Vec<u8> = whole.frames.concat();
    assert_eq!(
        &input[..consumed.len()],
        &consumed[..],
        "frames are not the input"
    );
}

#[test]
fn framer_and_parser_hold_their_invariants_on_mutated_responses() {
    let seeds = seeds();
    for seed in &seeds {
        check(seed, &mut fastrand::Rng::with_seed(1));
    }
    let secs: u64 = std::env::var("MAILFERRY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("MAILFERRY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("parser fuzz: seed {seed}, {secs} s (MAILFERRY_FUZZ_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    while Instant::now() < until {
        let input = mutate(&mut rng, &seeds);
        let case_seed = rng.u64(..);
        let outcome = std::panic::catch_unwind(|| {
            check(&input, &mut fastrand::Rng::with_seed(case_seed));
        });
        if let Err(panic) = outcome {
            let path = std::env::temp_dir().join(format!("mailferry-fuzz-{seed}-{cases}.imap"));
            std::fs::write(&path, &input).expect("saving the failing input");
            std::panic::resume_unwind(Box::new(format!(
                "case {cases} of seed {seed} failed; its input is {}: {:?}",
                path.display(),
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            )));
        }
        cases += 1;
    }
    eprintln!("parser fuzz: {cases} cases passed");
    assert!(cases > 0);
}
