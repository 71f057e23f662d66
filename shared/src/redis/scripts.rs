//! The Lua scripts of the control plane, one file each under `lua/` (each opens with
//! its KEYS, ARGV and return value), every one prefixed with `lua/helpers.lua`; and the
//! typed requests of the scripts whose arguments are more than a few scalars: one JSON
//! value in `ARGV[1]` (encoded with `control::json`), decoded by the script with
//! `cjson.decode`. The thin Rust function of each script is the `RedisStore` method (or,
//! for the slots, the `SharedSlots` writer) its header names.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;
use serde::Serialize;

use crate::domain::status::JobState;

const HELPERS: &str = include_str!("lua/helpers.lua");

/// Each script once: its static (the helpers and its file) and, for the tests, its
/// name and source, so a new script cannot escape the checks below.
macro_rules! scripts {
    ($($name:ident => $file:literal),* $(,)?) => {
        $(
            pub(crate) static $name: LazyLock<Script> = LazyLock::new(|| {
                Script::new(&format!(
                    "{HELPERS}\n{}",
                    include_str!(concat!("lua/", $file, ".lua"))
                ))
            });
        )*
        /// Every script's file name and source (without the helpers).
        #[cfg(test)]
        const SOURCES: &[(&str, &str)] =
            &[$(($file, include_str!(concat!("lua/", $file, ".lua")))),*];
    };
}

scripts! {
    CLAIM => "claim",
    RENEW => "renew",
    FINISH => "finish",
    BEGIN_PASS => "begin_pass",
    SET_STATES => "set_states",
    SCHEDULE_NEXT => "schedule_next",
    CLOSE => "close",
    LEADER_ACQUIRE => "leader_acquire",
    LEADER_RENEW => "leader_renew",
    LEADER_RELEASE => "leader_release",
    REPLACE_SECRET => "replace_secret",
    SLOTS_TAKE => "slots_take",
    SLOTS_SET => "slots_set",
    SLOTS_PAUSE => "slots_pause",
}

/// Values a script call names, each once, by index: in KEYS (from 1), or in ARGV (from
/// 2, after the request). Claim fields are bytes (a folder's name on the wire need not
/// be UTF-8), which a JSON request cannot carry: they follow it in ARGV and the request
/// names them by index.
pub(crate) struct Table {
    pub names: Vec<Vec<u8>>,
    index: HashMap<Vec<u8>, usize>,
    first: usize,
}

impl Table {
    pub fn keys() -> Self {
        Table {
            names: Vec::new(),
            index: HashMap::new(),
            first: 1,
        }
    }

    pub fn args() -> Self {
        Table {
            names: Vec::new(),
            index: HashMap::new(),
            first: 2,
        }
    }

    pub fn index(&mut self, value: impl Into<Vec<u8>>) -> usize {
        let value = value.into();
        if let Some(i) = self.index.get(&value) {
            return *i;
        }
        self.names.push(value.clone());
        let i = self.first + self.names.len() - 1;
        self.index.insert(value, i);
        i
    }
}

/// A counter's name and what to add to it.
pub(crate) type Delta<'a> = (&'a str, i64);

/// `claim.lua`'s request.
#[derive(Serialize)]
pub(crate) struct ClaimRequest<'a> {
    pub holder: &'a str,
    pub ttl_ms: u64,
    pub users: &'a [&'a str],
    /// The state a granted job gets.
    pub running: JobState,
    pub jobs: Vec<ClaimJob>,
}

#[derive(Serialize)]
pub(crate) struct ClaimJob {
    /// Its user, by 1-based index into the request's users.
    pub user: usize,
    pub id: String,
    /// Its claim field, by index into ARGV.
    pub field: usize,
}

/// `renew.lua`'s request. Keys are 1-based indexes into the call's KEYS.
#[derive(Serialize)]
pub(crate) struct RenewRequest<'a> {
    pub ttl_ms: u64,
    pub runs_key: usize,
    /// Runs of the worker that have finished: their sequence numbers are dropped.
    pub forget: &'a [String],
    pub runs: Vec<RenewRun<'a>>,
}

#[derive(Serialize)]
pub(crate) struct RenewRun<'a> {
    pub holder: &'a str,
    pub claims: usize,
    pub intent: usize,
    pub progress: usize,
    pub seq: u64,
    /// The claim fields the run holds, by index into ARGV.
    pub fields: Vec<usize>,
    pub users: Vec<UserCounts<'a>>,
    /// Checkpoint key index and value.
    pub checkpoints: Vec<(usize, String)>,
}

#[derive(Serialize)]
pub(crate) struct UserCounts<'a> {
    pub user: &'a str,
    /// No zero deltas.
    pub counts: Vec<Delta<'a>>,
}

/// `finish.lua`'s request.
#[derive(Serialize)]
pub(crate) struct FinishRequest<'a> {
    pub holder: &'a str,
    pub seq: u64,
    pub users: &'a [&'a str],
    /// Each job's claim field, by index into ARGV.
    pub fields: Vec<usize>,
    /// In the order of `users`.
    pub per_user: Vec<FinishUser<'a>>,
    /// One value per checkpoint key after the six fixed keys.
    pub checkpoints: Vec<String>,
    pub linger_ms: u64,
    /// Claim fields (indexes into ARGV) kept `linger_ms` longer: the jobs handed back.
    pub keep: Vec<usize>,
}

#[derive(Serialize)]
pub(crate) struct FinishUser<'a> {
    /// The user's member of `P:dispatch`.
    pub member: String,
    pub states: Vec<FinishState<'a>>,
    /// No zero deltas.
    pub counts: Vec<Delta<'a>>,
}

#[derive(Serialize)]
pub(crate) struct FinishState<'a> {
    pub id: String,
    /// Index into ARGV.
    pub field: usize,
    /// None: the job's state is left as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'a JobState>,
}

/// `begin_pass.lua`'s request.
#[derive(Serialize)]
pub(crate) struct BeginPassRequest<'a> {
    /// The recheck's due score.
    pub recheck: String,
    pub users: Vec<BeginPassUser<'a>>,
}

#[derive(Serialize)]
pub(crate) struct BeginPassUser<'a> {
    pub user: &'a str,
    /// The JSON texts stored: the pass record, the job states, the job specs.
    pub record: String,
    pub states: String,
    pub specs: String,
}

/// `slots_take.lua`'s request.
#[derive(Serialize)]
pub(crate) struct TakeRequest<'a> {
    pub process: &'a str,
    pub ttl_ms: u64,
    pub asks: Vec<TakeAsk<'a>>,
}

#[derive(Serialize)]
pub(crate) struct TakeAsk<'a> {
    pub account: &'a str,
    pub want: u32,
    pub account_cap: u32,
    /// `""`: no host lease asked.
    pub host: &'a str,
    pub host_min: u32,
    pub host_max: u32,
    pub host_cap: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::status::Intent;

    /// The helpers and every script.
    fn all_scripts() -> Vec<(&'static str, &'static str)> {
        std::iter::once(("helpers", HELPERS))
            .chain(SOURCES.iter().copied())
            .collect()
    }

    /// The quoted words a script's code (not its comments) compares with `==` or `~=`,
    /// or writes with HSET as a value of the intent hash.
    fn compared_words(code: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in code.lines() {
            let line = line.split("--").next().unwrap_or("");
            for op in ["== '", "~= '"] {
                for (at, _) in line.match_indices(op) {
                    let rest = &line[at + op.len()..];
                    if let Some(end) = rest.find('\'') {
                        out.push(rest[..end].to_string());
                    }
                }
            }
        }
        out
    }

    fn serde_name<T: Serialize>(value: &T) -> String {
        match serde_json::to_value(value).unwrap() {
            serde_json::Value::String(s) => s,
            serde_json::Value::Object(map) => map["state"].as_str().unwrap().to_string(),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn every_state_and_intent_a_script_compares_against_is_the_enums_serde_name() {
        let states: Vec<String> = [
            JobState::Waiting,
            JobState::Queued,
            JobState::Running,
            JobState::Throttled {
                server_says: String::new(),
            },
            JobState::Done {
                verified: true,
                mismatch: None,
                counts: None,
            },
            JobState::Failed {
                reason: String::new(),
            },
        ]
        .iter()
        .map(serde_name)
        .collect();
        let intents: Vec<String> = [
            Intent::Idle,
            Intent::Active,
            Intent::Stopped,
            Intent::Closing,
            Intent::Closed,
        ]
        .iter()
        .map(serde_name)
        .collect();
        // The scripts' own words, which are no enum's: a lease field's pause marker and
        // slots_take.lua's verdict (both read only by the scripts and slots.rs).
        let own = ["", "!pause", "ok"];
        let mut checked = 0;
        for (name, code) in all_scripts() {
            for word in compared_words(code) {
                assert!(
                    states.contains(&word) || intents.contains(&word) || own.contains(&word.as_str()),
                    "{name}.lua compares against {word:?}, which is neither a JobState ({states:?}) \
                     nor an Intent ({intents:?})"
                );
                checked += 1;
            }
        }
        // claim.lua: done, failed, stopped, closed, idle; close.lua: closing
        assert!(
            checked >= 6,
            "only {checked} words found: the scan is broken"
        );
        // What the scripts write as an intent is one too.
        let close = SOURCES.iter().find(|(name, _)| *name == "close").unwrap().1;
        assert!(close.contains("ARGV[1], 'closed')"));
        assert!(intents.contains(&"closed".to_string()));
        assert_eq!(
            crate::redis::control::intent_name(Intent::Closing),
            "closing"
        );
        for intent in [
            Intent::Idle,
            Intent::Active,
            Intent::Stopped,
            Intent::Closing,
            Intent::Closed,
        ] {
            assert_eq!(
                crate::redis::control::intent_name(intent),
                serde_name(&intent)
            );
        }
    }

    #[test]
    fn the_word_scan_sees_a_misspelt_state() {
        assert_eq!(
            compared_words("if s == 'don' then -- == 'comment'\nelseif x ~= 'stoped' then"),
            ["don", "stoped"]
        );
    }

    #[test]
    fn every_script_opens_with_its_header_of_keys_argv_and_return() {
        for (name, code) in all_scripts().into_iter().skip(1) {
            let header: Vec<&str> = code.lines().take_while(|l| l.starts_with("--")).collect();
            let header = header.join("\n");
            assert!(
                header.starts_with(&format!("-- {name}.lua: ")),
                "{name}: {header}"
            );
            for part in ["KEYS[1", "ARGV[1]", "Returns"] {
                assert!(header.contains(part), "{name}.lua's header lacks {part}");
            }
        }
    }
}
