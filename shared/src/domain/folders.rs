//! Folder mapping: which source folder lands in which target folder.
//!
//! A pure function of the two LIST results, the two namespaces and the admin's rules, so
//! every case (special-use, localized names, delimiters, modified UTF-7, escaping,
//! Gmail's virtual folders) is unit-tested without a server. The mapping is injective:
//! two source folders never share a target folder, which keeps "one writer per target
//! folder" true by construction.
//!
//! A folder holding every message (`\All`: Gmail's All Mail) is copied *archive-only*:
//! only its messages that are in no other folder (Gmail's archived mail, with no
//! label) go, into the archive folder ([`Rules::archive`], default `Archive`). Labelled
//! mail is copied from its label folders and never a second time from All Mail. Which
//! messages those are is the engine's to find (`worker::archive`); the mapping marks the
//! folder ([`FolderMapping::archive_only`]) and names its target.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::domain::mutf7;
pub use crate::imap::mailbox::{ListEntry, Namespace};
use crate::providers::is_gmail_system_container;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum SpecialUse {
    Inbox,
    Sent,
    Drafts,
    Trash,
    Junk,
    Archive,
    /// Virtual: every message (Gmail's All Mail).
    All,
    /// Virtual: flagged messages (Gmail's Starred).
    Flagged,
    /// Virtual: Gmail's Important.
    Important,
}

impl SpecialUse {
    fn from_attribute(attr: &str) -> Option<Self> {
        Some(match attr.to_ascii_lowercase().as_str() {
            "\\sent" => SpecialUse::Sent,
            "\\drafts" => SpecialUse::Drafts,
            "\\trash" => SpecialUse::Trash,
            "\\junk" => SpecialUse::Junk,
            "\\archive" => SpecialUse::Archive,
            "\\all" => SpecialUse::All,
            "\\flagged" => SpecialUse::Flagged,
            "\\important" => SpecialUse::Important,
            _ => return None,
        })
    }

    /// Guesses from well-known (also localized) names, for servers without SPECIAL-USE.
    fn from_name(path: &str) -> Option<Self> {
        let lower = path.to_lowercase();
        let lower = lower
            .strip_prefix("[gmail]/")
            .or_else(|| lower.strip_prefix("[google mail]/"))
            .unwrap_or(&lower);
        Some(match lower {
            "sent"
            | "sent items"
            | "sent messages"
            | "sent mail"
            | "sent-mail"
            | "gesendet"
            | "gesendete objekte"
            | "gesendete elemente"
            | "éléments envoyés"
            | "envoyés"
            | "enviados"
            | "elementos enviados"
            | "posta inviata"
            | "inviati"
            | "verzonden items"
            | "отправленные"
            | "送信済み" => SpecialUse::Sent,
            "drafts" | "draft" | "entwürfe" | "brouillons" | "borradores" | "bozze"
            | "concepten" | "черновики" | "下書き" => SpecialUse::Drafts,
            "trash"
            | "bin"
            | "deleted items"
            | "deleted messages"
            | "papierkorb"
            | "gelöschte elemente"
            | "corbeille"
            | "éléments supprimés"
            | "papelera"
            | "cestino"
            | "prullenbak"
            | "корзина"
            | "ごみ箱" => SpecialUse::Trash,
            "junk"
            | "spam"
            | "junk e-mail"
            | "junk email"
            | "bulk mail"
            | "spamverdacht"
            | "courrier indésirable"
            | "correo no deseado"
            | "posta indesiderata"
            | "ongewenste e-mail"
            | "спам" => SpecialUse::Junk,
            "archive" | "archives" | "archiv" => SpecialUse::Archive,
            "all mail" => SpecialUse::All,
            "starred" => SpecialUse::Flagged,
            "important" => SpecialUse::Important,
            _ => return None,
        })
    }

    /// A folder that shows messages of other folders (All Mail, Starred, Important).
    pub fn is_virtual(self) -> bool {
        matches!(
            self,
            SpecialUse::All | SpecialUse::Flagged | SpecialUse::Important
        )
    }
}

/// The admin's include / exclude / rename rules. Patterns match the source folder's
/// decoded path with `/` between levels; `*` matches any run of characters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// When not empty, only folders matching one of these are copied.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// `(from, to)`: a folder whose path matches `from` lands at `to`; with a trailing
    /// `/*` on both, a whole subtree moves (`Archive/*` → `Old/*`). Kept as `FROM=TO`
    /// strings in a batch's record and the API.
    #[serde(with = "rename_rules")]
    pub rename: Vec<(String, String)>,
    /// The target folder (path, `/` between levels) for the messages of a `\All` folder
    /// (Gmail's All Mail) that are in no other folder. `None`: the target's
    /// `\Archive` folder if it has one, else `Archive`, else (taken by a source folder of
    /// that name) `All Mail`. Exclude the `\All` folder to leave archived mail behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
}

/// Where archived-only mail goes when neither the rules nor the target name a folder,
/// and the name tried next when a source folder is called that already.
pub const DEFAULT_ARCHIVE: &str = "Archive";
const FALLBACK_ARCHIVE: &str = "All Mail";

/// The most rules of each kind a batch may have, and the longest pattern.
pub const MAX_RULES: usize = 100;
pub const MAX_PATTERN: usize = 1000;

/// `rename` as `FROM=TO` strings.
mod rename_rules {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(rules: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(rules.iter().map(|(from, to)| format!("{from}={to}")))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|spec| super::Rules::parse_rename(spec).map_err(serde::de::Error::custom))
            .collect()
    }
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.include.is_empty()
            && self.exclude.is_empty()
            && self.rename.is_empty()
            && self.archive.is_none()
    }

    /// Bounded and non-empty: at most [`MAX_RULES`] of each kind, each pattern 1 to
    /// [`MAX_PATTERN`] bytes with no control character. The error names the rule.
    pub fn validate(&self) -> Result<(), String> {
        let patterns = self
            .include
            .iter()
            .map(|p| ("include", p.as_str()))
            .chain(self.exclude.iter().map(|p| ("exclude", p.as_str())))
            .chain(
                self.rename
                    .iter()
                    .flat_map(|(f, t)| [("rename", f.as_str()), ("rename", t.as_str())]),
            )
            .chain(self.archive.iter().map(|a| ("archive", a.as_str())));
        for (kind, list) in [
            ("include", self.include.len()),
            ("exclude", self.exclude.len()),
            ("rename", self.rename.len()),
        ] {
            if list > MAX_RULES {
                return Err(format!("{kind}: at most {MAX_RULES} rules"));
            }
        }
        for (kind, p) in patterns {
            if p.is_empty() || p.len() > MAX_PATTERN || p.chars().any(char::is_control) {
                return Err(format!(
                    "{kind}: {p:?} must be 1 to {MAX_PATTERN} bytes without control characters"
                ));
            }
        }
        Ok(())
    }

    /// Parses `FROM=TO`.
    pub fn parse_rename(spec: &str) -> Result<(String, String), String> {
        let (from, to) = spec
            .split_once('=')
            .ok_or_else(|| format!("rename rule {spec:?} must look like FROM=TO"))?;
        if from.is_empty() || to.is_empty() {
            return Err(format!("rename rule {spec:?} has an empty side"));
        }
        Ok((from.to_string(), to.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "action", content = "reason", rename_all = "lowercase")]
pub enum Action {
    /// Copy messages (a selectable folder).
    Copy,
    /// Only create the folder (a `\Noselect` container).
    Create,
    Exclude(String),
}

/// Where one source folder goes. (Read back from JSON, as the API's preview sends it,
/// the wire names and levels are empty: they are never sent.)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FolderMapping {
    #[serde(skip)]
    pub source_wire: Bytes,
    /// Decoded source path, `/` between levels (for people and rules).
    pub source_path: String,
    /// Decoded target path, `/` between levels.
    pub target_path: String,
    #[serde(skip)]
    pub target_wire: Bytes,
    /// The target levels before escaping (to re-encode if the target refuses the name).
    #[serde(skip)]
    pub target_levels: Vec<String>,
    pub special_use: Option<SpecialUse>,
    /// A `\All` folder: only its messages found in no other folder are copied
    /// (see the module's notes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub archive_only: bool,
    /// The target folder already exists.
    pub target_exists: bool,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("folder mapping: {0}")]
pub struct MappingError(pub String);

/// Splits a wire name into decoded levels, after removing the namespace prefix.
fn levels(wire: &[u8], ns: &Namespace) -> Vec<String> {
    let decoded = mutf7::decode_lenient(wire);
    let without_prefix = if !ns.prefix.is_empty() && !decoded.eq_ignore_ascii_case("INBOX") {
        decoded
            .strip_prefix(&ns.prefix)
            .map(str::to_string)
            .unwrap_or(decoded)
    } else {
        decoded
    };
    match ns.delimiter {
        Some(d) => without_prefix.split(d).map(str::to_string).collect(),
        None => vec![without_prefix],
    }
}

/// Makes one level safe for the target: its delimiter becomes a look-alike so the level
/// is not split (`a.b` on a `.` server shows as `a․b`); control characters become `_`.
pub fn escape_level(level: &str, target_delimiter: Option<char>) -> String {
    escape_chars(level, |c| Some(c) == target_delimiter)
}

/// The fallback when a target refuses a name: every character that serves as a
/// hierarchy delimiter somewhere (`.`, `/`, `\`) becomes its look-alike.
pub fn escape_level_strict(level: &str) -> String {
    escape_chars(level, |c| matches!(c, '.' | '/' | '\\'))
}

fn escape_chars(level: &str, replace: impl Fn(char) -> bool) -> String {
    level
        .chars()
        .map(|c| match c {
            c if replace(c) => match c {
                '.' => '\u{2024}',  // ONE DOT LEADER
                '/' => '\u{2215}',  // DIVISION SLASH
                '\\' => '\u{29F5}', // REVERSE SOLIDUS OPERATOR
                _ => '_',
            },
            c if c.is_control() => '_',
            c => c,
        })
        .collect()
}

fn encode_target(levels: &[String], ns: &Namespace) -> (String, Bytes) {
    encode_levels(
        levels
            .iter()
            .map(|l| escape_level(l, ns.delimiter))
            .collect(),
        ns,
    )
}

/// The strictly escaped name for a target that refused [`encode_target`]'s, or `None`
/// if strict escaping changes nothing (the refusal has another cause).
pub fn encode_target_strict(levels: &[String], ns: &Namespace) -> Option<(String, Bytes)> {
    let plain: Vec<String> = levels
        .iter()
        .map(|l| escape_level(l, ns.delimiter))
        .collect();
    let strict: Vec<String> = plain.iter().map(|l| escape_level_strict(l)).collect();
    (strict != plain).then(|| encode_levels(strict, ns))
}

fn encode_levels(escaped: Vec<String>, ns: &Namespace) -> (String, Bytes) {
    let path = escaped.join("/");
    if escaped.len() == 1 && escaped[0].eq_ignore_ascii_case("INBOX") {
        return ("INBOX".into(), Bytes::from_static(b"INBOX"));
    }
    let delim = ns.delimiter.map(String::from).unwrap_or_default();
    let encoded: Vec<String> = escaped.iter().map(|l| mutf7::encode(l)).collect();
    let wire = format!("{}{}", mutf7::encode(&ns.prefix), encoded.join(&delim));
    (path, Bytes::from(wire))
}

/// Matches `pattern` (with `*` wildcards) against `text`, case-sensitively.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn rename(rules: &Rules, path: &str) -> Option<String> {
    for (from, to) in &rules.rename {
        if let (Some(from_base), Some(to_base)) = (from.strip_suffix("/*"), to.strip_suffix("/*")) {
            if path == from_base {
                return Some(to_base.to_string());
            }
            if let Some(rest) = path
                .strip_prefix(from_base)
                .and_then(|r| r.strip_prefix('/'))
            {
                return Some(format!("{to_base}/{rest}"));
            }
        } else if glob_match(from, path) {
            return Some(to.clone());
        }
    }
    None
}

/// Whether any entry carries a special-use attribute: a server that has them names
/// its special folders by attribute, and its names are not guessed from.
fn has_special_use_attributes(entries: &[ListEntry]) -> bool {
    entries.iter().any(|e| {
        e.attributes
            .iter()
            .any(|a| SpecialUse::from_attribute(a).is_some())
    })
}

/// The target's folders by path, and its special-use folders (as levels).
fn index_target(
    target: &[ListEntry],
    target_ns: &Namespace,
) -> (BTreeSet<String>, BTreeMap<SpecialUse, Vec<Vec<String>>>) {
    let target_has_attrs = has_special_use_attributes(target);
    let mut target_paths: BTreeSet<String> = BTreeSet::new();
    let mut target_special: BTreeMap<SpecialUse, Vec<Vec<String>>> = BTreeMap::new();
    for entry in target {
        let levels = levels(&entry.wire_name, target_ns);
        let path = levels.join("/");
        let special = if target_has_attrs {
            entry
                .attributes
                .iter()
                .find_map(|a| SpecialUse::from_attribute(a))
        } else {
            SpecialUse::from_name(&path)
        };
        if let Some(s) = special {
            target_special.entry(s).or_default().push(levels);
        }
        target_paths.insert(path);
    }
    (target_paths, target_special)
}

/// A source folder on its way to a target folder.
struct Candidate {
    entry_index: usize,
    levels: Vec<String>,
    path: String,
    special: Option<SpecialUse>,
    from_attribute: bool,
    /// Copied archive-only: mapped last, so that its default name yields to a
    /// source folder of the same name.
    archive: bool,
}

/// The source folders in the order they claim target folders: attribute-based special
/// use first, then name guesses, then the rest, so "Drafts" (\Drafts) wins over a plain
/// folder called "Entwürfe". Among guesses for one special use, a folder already named
/// like the target's folder for it ("Drafts" → "Drafts") goes before a localized one
/// ("Entwürfe"). The archive-only folder goes last.
fn source_candidates(
    source: &[ListEntry],
    source_ns: &Namespace,
    target_special: &BTreeMap<SpecialUse, Vec<Vec<String>>>,
) -> Vec<Candidate> {
    let source_has_attrs = has_special_use_attributes(source);
    let mut candidates = Vec::new();
    for (i, entry) in source.iter().enumerate() {
        let levels = levels(&entry.wire_name, source_ns);
        let path = levels.join("/");
        let path = if path.eq_ignore_ascii_case("INBOX") {
            "INBOX".to_string()
        } else {
            path
        };
        let by_attr = entry
            .attributes
            .iter()
            .find_map(|a| SpecialUse::from_attribute(a));
        let (special, from_attribute) = if path == "INBOX" {
            (Some(SpecialUse::Inbox), true)
        } else if by_attr.is_some() {
            (by_attr, true)
        } else if !source_has_attrs {
            (SpecialUse::from_name(&path), false)
        } else {
            (None, false)
        };
        candidates.push(Candidate {
            entry_index: i,
            archive: special == Some(SpecialUse::All) && entry.selectable(),
            levels,
            path,
            special,
            from_attribute,
        });
    }
    let named_like_target = |c: &Candidate| {
        c.special
            .and_then(|s| target_special.get(&s))
            .is_some_and(|all| all.contains(&c.levels))
    };
    candidates.sort_by_key(|c| {
        (
            c.archive,
            !c.from_attribute || c.special.is_none(),
            c.special.is_none(),
            !named_like_target(c),
            c.entry_index,
        )
    });
    candidates
}

/// What happens to a source folder: the admin's rules first, then what the folder is
/// (archive-only, virtual, Gmail's container, selectable or only a parent).
fn action_for(c: &Candidate, entry: &ListEntry, rules: &Rules) -> Action {
    let explicitly_included = rules.include.iter().any(|p| glob_match(p, &c.path));
    if !rules.include.is_empty() && !explicitly_included {
        Action::Exclude("not matched by any include rule".into())
    } else if rules.exclude.iter().any(|p| glob_match(p, &c.path)) {
        Action::Exclude("matched an exclude rule".into())
    } else if c.archive {
        Action::Copy
    } else if c.special.is_some_and(SpecialUse::is_virtual) && !explicitly_included {
        Action::Exclude(
            "virtual folder (Starred / Important): its messages are copied from the \
             folders (labels) they are in"
                .into(),
        )
    } else if !entry.selectable() && c.levels.len() == 1 && is_gmail_system_container(&c.levels[0])
    {
        Action::Exclude(
            "Gmail's container of its system folders, which lose it at the target".into(),
        )
    } else if entry.selectable() {
        Action::Copy
    } else {
        Action::Create
    }
}

/// Computes the mapping of every source folder.
pub fn map_folders(
    source: &[ListEntry],
    source_ns: &Namespace,
    target: &[ListEntry],
    target_ns: &Namespace,
    rules: &Rules,
) -> Result<Vec<FolderMapping>, MappingError> {
    let (target_paths, target_special) = index_target(target, target_ns);
    let candidates = source_candidates(source, source_ns, &target_special);
    // A target folder with a source folder's own name is that folder's, not a special
    // use's to take: else what a run finds at the target decides the mapping, and an
    // interrupted run that created "Entwürfe" but not yet "Drafts" would send the
    // source's \Drafts there on the next run, onto the source's own "Entwürfe".
    let source_paths: BTreeSet<String> = candidates.iter().map(|c| c.path.clone()).collect();
    let mut claimed: BTreeMap<String, String> = BTreeMap::new(); // target path → source path
    let mut out: Vec<(usize, FolderMapping)> = Vec::new();
    for c in candidates {
        let entry = &source[c.entry_index];
        let action = action_for(&c, entry, rules);
        let named = rename(rules, &c.path).or_else(|| rules.archive.clone().filter(|_| c.archive));
        // An archive folder the admin did not name goes where the target keeps archives.
        let special_at_target = if c.archive {
            Some(SpecialUse::Archive)
        } else {
            c.special
        };
        let target_levels: Vec<String> = if let Some(named) = &named {
            named.split('/').map(str::to_string).collect()
        } else if let Some(t) = special_at_target
            .and_then(|s| target_special.get(&s))
            .and_then(|all| {
                // its own name first, then the first that no other source folder is named
                let free = |l: &&Vec<String>| {
                    let path = l.join("/");
                    !claimed.contains_key(&path)
                        && (**l == c.levels || !source_paths.contains(&path))
                };
                all.iter()
                    .filter(free)
                    .find(|l| **l == c.levels)
                    .or_else(|| all.iter().find(free))
            })
        {
            t.clone()
        } else if c.archive {
            let free =
                |name: &str| !claimed.contains_key(&encode_target(&[name.into()], target_ns).0);
            let name = [DEFAULT_ARCHIVE, FALLBACK_ARCHIVE]
                .into_iter()
                .find(|n| free(n))
                .unwrap_or(DEFAULT_ARCHIVE);
            vec![name.to_string()]
        } else if c.special == Some(SpecialUse::Inbox) {
            vec!["INBOX".to_string()]
        } else if c.special.is_some()
            && c.levels.len() > 1
            && is_gmail_system_container(&c.levels[0])
        {
            // Gmail's system folders lose their "[Gmail]" container at the target.
            c.levels[1..].to_vec()
        } else {
            c.levels.clone()
        };
        let (target_path, target_wire) = encode_target(&target_levels, target_ns);
        let target_levels = target_levels.clone();
        if matches!(action, Action::Copy | Action::Create) {
            if let Some(other) = claimed.get(&target_path) {
                let remedy = if c.archive {
                    "name another archive folder for its messages in no other folder"
                } else {
                    "add a rename rule for one of them"
                };
                return Err(MappingError(format!(
                    "source folders {other:?} and {:?} would both land in target folder {target_path:?}; \
                     {remedy}",
                    c.path
                )));
            }
            claimed.insert(target_path.clone(), c.path.clone());
        }
        out.push((
            c.entry_index,
            FolderMapping {
                source_wire: entry.wire_name.clone(),
                source_path: c.path,
                target_exists: target_paths.contains(&target_path),
                target_path,
                target_wire,
                target_levels,
                special_use: c.special,
                archive_only: c.archive && action == Action::Copy,
                action,
            },
        ));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, m)| m).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, delim: char, attrs: &[&str]) -> ListEntry {
        ListEntry {
            wire_name: Bytes::from(mutf7::encode(name)),
            delimiter: Some(delim),
            attributes: attrs.iter().map(|a| a.to_ascii_lowercase()).collect(),
        }
    }

    fn ns(prefix: &str, d: char) -> Namespace {
        Namespace {
            prefix: prefix.into(),
            delimiter: Some(d),
        }
    }

    fn find<'a>(m: &'a [FolderMapping], source: &str) -> &'a FolderMapping {
        m.iter().find(|f| f.source_path == source).unwrap()
    }

    #[test]
    fn special_use_lands_on_the_targets_own_folders() {
        let src = [
            entry("INBOX", '/', &[]),
            entry("Sent Items", '/', &["\\Sent"]),
            entry("Deleted Items", '/', &["\\Trash"]),
            entry("Drafts", '/', &["\\Drafts"]),
            entry("Entwürfe", '/', &[]),
        ];
        let dst = [
            entry("INBOX", '.', &[]),
            entry("Sent", '.', &["\\Sent"]),
            entry("Trash", '.', &["\\Trash"]),
            entry("Drafts", '.', &["\\Drafts"]),
        ];
        let m = map_folders(&src, &ns("", '/'), &dst, &ns("", '.'), &Rules::default()).unwrap();
        assert_eq!(find(&m, "Sent Items").target_path, "Sent");
        assert!(find(&m, "Sent Items").target_exists);
        assert_eq!(find(&m, "Deleted Items").target_path, "Trash");
        assert_eq!(find(&m, "Drafts").target_path, "Drafts");
        // a plain folder with a localized drafts name stays itself: the source has attributes
        assert_eq!(find(&m, "Entwürfe").target_path, "Entwürfe");
        assert_eq!(find(&m, "Entwürfe").target_wire.as_ref(), b"Entw&APw-rfe");
        assert_eq!(find(&m, "INBOX").target_wire.as_ref(), b"INBOX");
    }

    /// A killed run created some target folders: the next run maps as the first did.
    #[test]
    fn a_half_created_target_does_not_change_the_mapping() {
        let src = [
            entry("INBOX", '/', &[]),
            entry("Drafts", '/', &["\\Drafts"]),
            entry("Entwürfe", '/', &[]),
            entry("Sent", '/', &["\\Sent"]),
        ];
        let fresh = [entry("INBOX", '/', &[])];
        // no attributes at the target: "Entwürfe" is guessed to be its drafts folder
        let half = [entry("INBOX", '/', &[]), entry("Entwürfe", '/', &[])];
        let full = [
            entry("INBOX", '/', &[]),
            entry("Entwürfe", '/', &[]),
            entry("Drafts", '/', &[]),
            entry("Sent", '/', &[]),
        ];
        for dst in [&fresh[..], &half[..], &full[..]] {
            let m = map_folders(&src, &ns("", '/'), dst, &ns("", '/'), &Rules::default())
                .unwrap_or_else(|e| panic!("{e} (target {} folders)", dst.len()));
            assert_eq!(find(&m, "Drafts").target_path, "Drafts", "{}", dst.len());
            assert_eq!(
                find(&m, "Entwürfe").target_path,
                "Entwürfe",
                "{}",
                dst.len()
            );
        }
    }

    #[test]
    fn a_folder_named_like_the_targets_special_folder_keeps_it() {
        // no attributes at the source: both are guessed to be drafts
        let src = [entry("Entwürfe", '.', &[]), entry("Drafts", '.', &[])];
        let dst = [entry("Drafts", '/', &["\\Drafts"])];
        let m = map_folders(
            &src,
            &ns("INBOX.", '.'),
            &dst,
            &ns("", '/'),
            &Rules::default(),
        )
        .unwrap();
        assert_eq!(find(&m, "Drafts").target_path, "Drafts");
        assert_eq!(find(&m, "Entwürfe").target_path, "Entwürfe");
    }

    #[test]
    fn names_guide_when_no_server_says_special_use() {
        let src = [
            entry("Gesendete Objekte", '.', &[]),
            entry("Projekte", '.', &[]),
        ];
        let dst = [entry("Sent", '/', &[]), entry("INBOX", '/', &[])];
        let m = map_folders(&src, &ns("", '.'), &dst, &ns("", '/'), &Rules::default()).unwrap();
        assert_eq!(find(&m, "Gesendete Objekte").target_path, "Sent");
        assert_eq!(find(&m, "Projekte").target_path, "Projekte");
    }

    #[test]
    fn delimiters_translate_and_a_name_with_the_targets_delimiter_is_escaped() {
        let src = [entry("Archive/2019", '/', &[]), entry("a.b/c", '/', &[])];
        let dst = [entry("INBOX", '.', &[])];
        let m = map_folders(
            &src,
            &ns("", '/'),
            &dst,
            &ns("INBOX.", '.'),
            &Rules::default(),
        )
        .unwrap();
        assert_eq!(
            find(&m, "Archive/2019").target_wire.as_ref(),
            b"INBOX.Archive.2019"
        );
        let escaped = find(&m, "a.b/c");
        assert_eq!(escaped.target_path, "a\u{2024}b/c");
        assert_eq!(escaped.target_wire.as_ref(), b"INBOX.a&ICQ-b.c");
        // and back: the target's levels decode to the same path
        assert_eq!(
            levels(&escaped.target_wire, &ns("INBOX.", '.')),
            vec!["a\u{2024}b", "c"]
        );
    }

    #[test]
    fn gmail_virtual_folders_are_not_copied_and_system_folders_lose_the_container() {
        let src = [
            entry("INBOX", '/', &[]),
            entry("[Gmail]", '/', &["\\Noselect"]),
            entry("[Gmail]/All Mail", '/', &["\\All"]),
            entry("[Gmail]/Starred", '/', &["\\Flagged"]),
            entry("[Gmail]/Sent Mail", '/', &["\\Sent"]),
            entry("Work/Clients", '/', &[]),
        ];
        let dst = [entry("INBOX", '/', &[])];
        let m = map_folders(&src, &ns("", '/'), &dst, &ns("", '/'), &Rules::default()).unwrap();
        let all = find(&m, "[Gmail]/All Mail");
        assert_eq!(all.action, Action::Copy);
        assert!(all.archive_only);
        assert_eq!(all.target_path, "Archive");
        assert!(matches!(
            find(&m, "[Gmail]/Starred").action,
            Action::Exclude(_)
        ));
        assert_eq!(find(&m, "[Gmail]/Sent Mail").target_path, "Sent Mail");
        assert!(!find(&m, "[Gmail]/Sent Mail").archive_only);
        assert!(matches!(find(&m, "[Gmail]").action, Action::Exclude(_)));
        assert_eq!(find(&m, "Work/Clients").target_path, "Work/Clients");
    }

    #[test]
    fn archived_mail_yields_its_default_name_to_a_label_and_takes_the_targets_archive() {
        let gmail = |extra: &[ListEntry]| {
            let mut src = vec![
                entry("INBOX", '/', &[]),
                entry("[Gmail]/All Mail", '/', &["\\All"]),
            ];
            src.extend_from_slice(extra);
            src
        };
        // A label called "Archive" keeps its name; archived mail takes Gmail's.
        let src = gmail(&[entry("Archive", '/', &[])]);
        let m = map_folders(&src, &ns("", '/'), &[], &ns("", '/'), &Rules::default()).unwrap();
        assert_eq!(find(&m, "Archive").target_path, "Archive");
        assert_eq!(find(&m, "[Gmail]/All Mail").target_path, "All Mail");
        // Both names taken, and no name given: the admin is asked for one.
        let src = gmail(&[entry("Archive", '/', &[]), entry("All Mail", '/', &[])]);
        let err =
            map_folders(&src, &ns("", '/'), &[], &ns("", '/'), &Rules::default()).unwrap_err();
        assert!(err.0.contains("name another archive folder"), "{err}");
        // The admin's name.
        let named = Rules {
            archive: Some("Old Mail/Archived".into()),
            ..Rules::default()
        };
        let src = gmail(&[entry("Archive", '/', &[]), entry("All Mail", '/', &[])]);
        let m = map_folders(&src, &ns("", '/'), &[], &ns("", '.'), &named).unwrap();
        assert_eq!(
            find(&m, "[Gmail]/All Mail").target_wire.as_ref(),
            b"Old Mail.Archived"
        );
        // The target's own \Archive folder, when no source folder has its name.
        let dst = [entry("Archives", '/', &["\\Archive"])];
        let m = map_folders(
            &gmail(&[]),
            &ns("", '/'),
            &dst,
            &ns("", '/'),
            &Rules::default(),
        )
        .unwrap();
        assert_eq!(find(&m, "[Gmail]/All Mail").target_path, "Archives");
        assert!(find(&m, "[Gmail]/All Mail").target_exists);
        // Excluded: archived mail stays behind.
        let without = Rules {
            exclude: vec!["[Gmail]/All Mail".into()],
            ..Rules::default()
        };
        let m = map_folders(&gmail(&[]), &ns("", '/'), &[], &ns("", '/'), &without).unwrap();
        assert!(matches!(
            find(&m, "[Gmail]/All Mail").action,
            Action::Exclude(_)
        ));
        assert!(!find(&m, "[Gmail]/All Mail").archive_only);
    }

    #[test]
    fn rules_include_exclude_and_rename() {
        let src = [
            entry("INBOX", '/', &[]),
            entry("Archive", '/', &[]),
            entry("Archive/2019", '/', &[]),
            entry("Old", '/', &[]),
            entry("Spam stuff", '/', &[]),
        ];
        let rules = Rules {
            include: vec![],
            exclude: vec!["Spam*".into()],
            rename: vec![("Archive/*".into(), "Old Mail/*".into())],
            archive: None,
        };
        let dst = [entry("INBOX", '/', &[])];
        let m = map_folders(&src, &ns("", '/'), &dst, &ns("", '/'), &rules).unwrap();
        assert_eq!(find(&m, "Archive").target_path, "Old Mail");
        assert_eq!(find(&m, "Archive/2019").target_path, "Old Mail/2019");
        assert!(matches!(find(&m, "Spam stuff").action, Action::Exclude(_)));
        let only = Rules {
            include: vec!["Archive*".into()],
            ..Rules::default()
        };
        let m = map_folders(&src, &ns("", '/'), &dst, &ns("", '/'), &only).unwrap();
        assert_eq!(find(&m, "Archive/2019").action, Action::Copy);
        assert!(matches!(find(&m, "INBOX").action, Action::Exclude(_)));
    }

    #[test]
    fn two_folders_onto_one_target_is_an_error_naming_both() {
        let src = [entry("A", '/', &[]), entry("B", '/', &[])];
        let rules = Rules {
            rename: vec![("A".into(), "X".into()), ("B".into(), "X".into())],
            ..Rules::default()
        };
        let err = map_folders(&src, &ns("", '/'), &[], &ns("", '/'), &rules).unwrap_err();
        assert!(err.0.contains("\"A\"") && err.0.contains("\"B\""), "{err}");
    }

    #[test]
    fn second_sent_folder_keeps_its_own_name() {
        let src = [
            entry("Sent", '/', &["\\Sent"]),
            entry("Sent Items", '/', &["\\Sent"]),
        ];
        let dst = [entry("Sent", '/', &["\\Sent"])];
        let m = map_folders(&src, &ns("", '/'), &dst, &ns("", '/'), &Rules::default()).unwrap();
        assert_eq!(find(&m, "Sent").target_path, "Sent");
        assert_eq!(find(&m, "Sent Items").target_path, "Sent Items");
    }

    #[test]
    fn strict_escaping_is_the_fallback_for_a_refused_name() {
        let levels = vec!["v1.2 notes".to_string()];
        let slash = ns("", '/');
        let (path, wire) = encode_target_strict(&levels, &slash).unwrap();
        assert_eq!(path, "v1\u{2024}2 notes");
        assert_eq!(wire.as_ref(), b"v1&ICQ-2 notes");
        assert_eq!(encode_target_strict(&["plain".to_string()], &slash), None);
    }

    #[test]
    fn glob() {
        assert!(glob_match("Archive/*", "Archive/2019/x"));
        assert!(glob_match("*Spam*", "My Spam box"));
        assert!(!glob_match("Archive", "Archive/2019"));
    }
}
