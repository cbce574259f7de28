//! Reading the files the service is configured by (rules, query files, key files): regular files
//! only (never a symlink, device or FIFO, so a file in `queries/` cannot point the service at
//! `/proc/self/environ` or stall a reload on a pipe), at most [`MAX_CONFIG_BYTES`], UTF-8. Errors
//! name the file and, for TOML, the line and column, and quote no more of the file's content
//! than an [`excerpt`] of the name or value at fault.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// The largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

fn refuse(path: &Path, why: &str) -> Error {
    Error::Config(format!("{}: {why}", path.display()))
}

/// Reads a configuration file under the rules above.
pub fn read_config_file(path: &Path) -> Result<String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| refuse(path, &io_reason(&e)))?;
    if !meta.file_type().is_file() {
        return Err(refuse(
            path,
            "not a regular file (symlinks, devices and FIFOs are refused)",
        ));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(refuse(path, "larger than 1 MiB"));
    }
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| refuse(path, &io_reason(&e)))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(refuse(path, "larger than 1 MiB"));
    }
    String::from_utf8(bytes).map_err(|_| refuse(path, "not UTF-8"))
}

/// Opens a regular file for reading. The path may have been swapped since it was looked at: the
/// open itself refuses a symlink (O_NOFOLLOW) and never waits on a FIFO (O_NONBLOCK), and what
/// it opened is checked to be a regular file.
fn open_regular(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| refuse(path, &io_reason(&e)))?;
    let opened = file.metadata().map_err(|e| refuse(path, &io_reason(&e)))?;
    if !opened.file_type().is_file() {
        return Err(refuse(path, "not a regular file"));
    }
    Ok(file)
}

/// An I/O error's kind, in words that cannot carry the file's content.
fn io_reason(e: &std::io::Error) -> String {
    e.kind().to_string()
}

/// The most characters of a file's name or value an error quotes.
pub const EXCERPT_CHARS: usize = 40;

/// A name or value from a configuration file (or a client's schema) as an error quotes it: its
/// first [`EXCERPT_CHARS`] characters, with control and invisible characters escaped, so that a
/// message stays one short line whatever the file holds.
pub fn excerpt(text: &str) -> String {
    excerpt_of(text, EXCERPT_CHARS)
}

/// [`excerpt`] of at most `chars` characters.
fn excerpt_of(text: &str, chars: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == chars {
            out.push('…');
            break;
        }
        match c {
            '\'' | '"' | '\\' => out.push(c),
            c => out.extend(c.escape_debug()),
        }
    }
    out
}

/// The longest TOML error message shown: the longest serde writes of our own names (a list of
/// every field of a query file) fits.
const MAX_TOML_MESSAGE: usize = 400;

/// A TOML error's message with the name or value at fault cut to an [`excerpt`]: serde's
/// messages quote the name or value they refused, which may be all of a long string. What else
/// they quote is ours (field and variant names); the result is one line, bounded whatever the
/// file holds.
fn toml_message(message: &str) -> String {
    let mut shown = String::new();
    let mut rest = message;
    // An unknown field or variant is named raw, backticks and all: the name ends where the
    // names expected instead begin.
    for lead in ["unknown field `", "unknown variant `"] {
        let Some(name_and_rest) = message.strip_prefix(lead) else {
            continue;
        };
        let end = ["`, expected", "`, there are no"]
            .iter()
            .filter_map(|tail| name_and_rest.rfind(tail))
            .max();
        if let Some(end) = end {
            shown = format!("{lead}{}`", excerpt(&name_and_rest[..end]));
            rest = &name_and_rest[end + 1..];
        }
    }
    shown.push_str(&quoted_excerpts(rest));
    excerpt_of(&shown, MAX_TOML_MESSAGE)
}

/// `message` with every run in backticks or double quotes cut to an [`excerpt`]. serde writes a
/// string value in double quotes with its own quotes escaped.
fn quoted_excerpts(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = if rest[open..].starts_with('`') {
            '`'
        } else {
            '"'
        };
        out.push_str(&rest[..=open]);
        let inside = &rest[open + 1..];
        let mut escaped = false;
        let close = inside.char_indices().find_map(|(i, c)| {
            let ends = c == quote && !escaped;
            escaped = quote == '"' && c == '\\' && !escaped;
            ends.then_some(i)
        });
        let Some(close) = close else {
            out.push_str(&excerpt(inside));
            return out;
        };
        out.push_str(&excerpt(&inside[..close]));
        out.push(quote);
        rest = &inside[close + 1..];
    }
    out.push_str(rest);
    out
}

/// A TOML error as `line:column: message`, without the snippet of the source `toml` would quote
/// and with the name or value at fault cut to an [`excerpt`].
pub fn toml_error(text: &str, e: &toml::de::Error) -> Error {
    let at = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before
                .rfind('\n')
                .map_or(before.len(), |i| before.len() - i - 1)
                + 1;
            format!("{line}:{column}: ")
        }
        None => String::new(),
    };
    Error::Config(format!("{at}{}", toml_message(e.message().trim())))
}

/// An error about a file's content, prefixed with the file: `path:line:column: message` for a
/// positioned one, `path: message` otherwise.
pub fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Config(msg) if msg.starts_with(|c: char| c.is_ascii_digit()) => {
            Error::Config(format!("{}:{msg}", path.display()))
        }
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        other => other,
    }
}

/// A torn last record of an append-only JSONL file (a write cut by a crash or a full disk),
/// found and dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The file.
    pub path: std::path::PathBuf,
    /// Bytes of the incomplete record dropped.
    pub dropped_bytes: u64,
}

/// Cuts a torn tail found by [`read_jsonl`] from its file, and syncs the cut.
pub fn cut_torn_tail(torn: &TornTail) -> Result<()> {
    let path = &torn.path;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| storage(path, io_reason(&e)))?;
    let len = file
        .metadata()
        .map_err(|e| storage(path, io_reason(&e)))?
        .len();
    file.set_len(len.saturating_sub(torn.dropped_bytes))
        .and_then(|_| file.sync_all())
        .map_err(|e| storage(path, io_reason(&e)))
}

/// Reads an append-only JSONL file written one `record\n` at a time and synced: every complete
/// line, and the incomplete record after the last newline, if any. With `repair`, that torn tail
/// is cut from the file (and the cut synced), so the next append starts on a line of its own;
/// without, the file is left as it is (for verification). A missing file reads as empty.
pub fn read_jsonl(path: &Path, repair: bool) -> Result<(Vec<String>, Option<TornTail>)> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(refuse(path, &io_reason(&e))),
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let torn = (complete < bytes.len()).then(|| TornTail {
        path: path.to_path_buf(),
        dropped_bytes: (bytes.len() - complete) as u64,
    });
    if let Some(torn) = torn.as_ref().filter(|_| repair) {
        cut_torn_tail(torn)?;
    }
    let text = std::str::from_utf8(&bytes[..complete]).map_err(|_| refuse(path, "not UTF-8"))?;
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    Ok((lines, torn))
}

fn storage(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{}: {why}", path.display()))
}

/// Parses the records [`read_jsonl`] read, naming the file and the line of the first that does
/// not parse (by its position and the kind of fault only: a record's text is never quoted).
pub fn parse_jsonl<T: serde::de::DeserializeOwned>(
    path: &Path,
    lines: &[String],
) -> Result<Vec<T>> {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                let fault = match e.classify() {
                    serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                        "not valid JSON"
                    }
                    _ => "not a record of this file",
                };
                storage(
                    path,
                    format!("line {}: {fault} (column {})", i + 1, e.column()),
                )
            })
        })
        .collect()
}

/// The ending every temporary file of the service has: a file being written before it is renamed
/// into place. Any such file found at start-up was left by a crash and is removed.
pub const TEMPORARY_SUFFIX: &str = ".tmp";

/// A temporary name beside `path` that no other writer in this process or another uses.
pub fn temporary_beside(path: &Path) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        "{name}.{}-{n}{TEMPORARY_SUFFIX}",
        std::process::id()
    ))
}

/// Makes a directory's entries (a file renamed or created in it) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| storage(dir, io_reason(&e)))
}

/// Writes `bytes` to `path` whole: a reader or a crash sees the old file or the new one, never
/// part of one. The bytes go to a temporary file beside it, synced, renamed into place, and the
/// directory is synced so that the rename itself survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = temporary_beside(path);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut file| file.write_all(bytes).and_then(|_| file.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(storage(path, io_reason(&e)));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// An append-only file of JSON records, one per line: the one way every such file of the service
/// (audit trail, privacy ledger, query archive) grows.
///
/// A record is written whole or not at all. A write that fails part-way (a full disk, a
/// file-size limit) is cut back to the end of the last whole record before the error is returned,
/// so the next append never lands on a fragment; a cut that cannot be made (or a failed sync)
/// leaves the log refusing records, because what is on disk is then unknown (it fails closed).
pub struct AppendLog {
    path: std::path::PathBuf,
    file: std::fs::File,
    /// The file's length after the last whole record.
    len: u64,
    /// Whole records in the file.
    records: u64,
    broken: Option<String>,
}

impl AppendLog {
    /// Opens `path` (created if missing) to append after its `records` whole records; the file
    /// must end with a whole record (a torn tail cut, see [`read_jsonl`]).
    pub fn open(path: &Path, records: u64) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| storage(path, io_reason(&e)))?;
        let len = file
            .metadata()
            .map_err(|e| storage(path, io_reason(&e)))?
            .len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
            records,
            broken: None,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whole records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// A second handle on the file, to sync it without holding the log (group commit).
    pub fn sync_handle(&self) -> Result<std::fs::File> {
        self.file
            .try_clone()
            .map_err(|e| storage(&self.path, io_reason(&e)))
    }

    /// Writes one record (`record` holds no newline) after the last, not yet synced. Returns its
    /// line number.
    pub fn write(&mut self, record: &[u8]) -> Result<u64> {
        use std::io::Write;
        if let Some(why) = &self.broken {
            return Err(storage(&self.path, format!("takes no more records: {why}")));
        }
        let line = self.records + 1;
        let mut bytes = Vec::with_capacity(record.len() + 1);
        bytes.extend_from_slice(record);
        bytes.push(b'\n');
        if let Err(e) = self.file.write_all(&bytes) {
            let cut = self.cut_back();
            return Err(storage(
                &self.path,
                format!("line {line}: {}; {cut}", io_reason(&e)),
            ));
        }
        self.len += bytes.len() as u64;
        self.records = line;
        Ok(line)
    }

    /// Writes one record and makes it durable. If it cannot be made durable it is cut back, so
    /// a failure leaves no trace of it (or the log refuses further records).
    pub fn append(&mut self, record: &[u8]) -> Result<u64> {
        let before = (self.len, self.records);
        let line = self.write(record)?;
        if let Err(e) = self.file.sync_data() {
            (self.len, self.records) = before;
            let cut = self.cut_back();
            return Err(storage(
                &self.path,
                format!("line {line}: {}; {cut}", io_reason(&e)),
            ));
        }
        Ok(line)
    }

    /// Whether a failure left what is on disk unknown.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Cuts the file back to its last whole record and syncs the cut; says what happened.
    fn cut_back(&mut self) -> String {
        match self
            .file
            .set_len(self.len)
            .and_then(|_| self.file.sync_data())
        {
            Ok(()) => "the partial record was cut back; nothing of it remains".to_string(),
            Err(e) => {
                let why = format!("a failed write could not be cut back ({})", io_reason(&e));
                self.broken = Some(why.clone());
                why
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.toml");
        std::fs::write(&file, "k = 1\n").unwrap();
        assert_eq!(read_config_file(&file).unwrap(), "k = 1\n");
        let link = dir.path().join("b.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let refused = read_config_file(&link).unwrap_err().to_string();
        assert!(refused.contains("not a regular file"), "{refused}");
        let big = dir.path().join("c.toml");
        std::fs::write(&big, vec![b'#'; 2 * 1024 * 1024]).unwrap();
        assert!(
            read_config_file(&big)
                .unwrap_err()
                .to_string()
                .contains("1 MiB")
        );
        assert!(read_config_file(dir.path()).is_err(), "a directory");
    }

    /// A symlink or a FIFO swapped in after the first look is refused by the open itself,
    /// without blocking on the FIFO (which has no writer).
    #[test]
    fn the_open_refuses_what_a_swap_could_put_there() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.toml");
        std::fs::write(&file, "k = 1\n").unwrap();
        assert!(open_regular(&file).is_ok());
        let link = dir.path().join("b.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_regular(&link).is_err(), "a symlink is not followed");
        let fifo = dir.path().join("c.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let refused = open_regular(&fifo).unwrap_err().to_string();
        assert!(refused.contains("not a regular file"), "{refused}");
    }

    #[test]
    fn a_torn_last_record_is_found_and_cut_only_when_repairing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        let (lines, torn) = read_jsonl(&path, false).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(torn.unwrap().dropped_bytes, 5);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            21,
            "verification changes nothing"
        );
        let (lines, torn) = read_jsonl(&path, true).unwrap();
        assert_eq!((lines.len(), torn.is_some()), (2, true));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        assert_eq!(read_jsonl(&path, true).unwrap().1, None, "once cut, whole");
        assert!(
            read_jsonl(&dir.path().join("none"), true)
                .unwrap()
                .0
                .is_empty()
        );
    }

    #[test]
    fn toml_errors_give_a_position_and_never_the_text() {
        let text = "a = 1\nsecret = TOPSECRETVALUE\n";
        let e = toml::from_str::<toml::Value>(text).unwrap_err();
        let shown = toml_error(text, &e).to_string();
        assert!(shown.contains("2:10"), "{shown}");
        assert!(!shown.contains("TOPSECRETVALUE"), "{shown}");
    }

    /// Found by the rules and query file fuzzers: serde's message quoted the whole of a value
    /// or a name the file got wrong.
    #[test]
    fn toml_errors_quote_at_most_an_excerpt_of_a_value_or_name() {
        let long = "SECRETVALUE".repeat(5);
        for text in [
            format!("k = \"{long}\""),
            format!("role = \"{long}\\\"{long}\""),
            format!("\"{long}`\\n{long}\" = 1"),
        ] {
            #[derive(Debug, serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            #[allow(dead_code)]
            struct Strict {
                k: Option<u32>,
                role: Option<crate::rules::Role>,
            }
            let e = toml::from_str::<Strict>(&text).unwrap_err();
            let shown = toml_error(&text, &e).to_string();
            assert!(!shown.contains(&long), "{shown}");
            assert!(!shown.contains('\n'), "{shown}");
            assert!(
                shown.contains("SECRETVALUESECRE"),
                "an excerpt is kept: {shown}"
            );
        }
        assert_eq!(excerpt("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(excerpt(&"x".repeat(50)), format!("{}…", "x".repeat(40)));
    }

    #[test]
    fn a_failed_append_is_cut_back_and_the_next_one_starts_on_its_own_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let mut log = AppendLog::open(&path, 0).unwrap();
        assert_eq!(log.append(b"{\"a\":1}").unwrap(), 1);
        // A file-size limit just past the end stands in for a full disk: the write is cut
        // short, and the error names the file and the line.
        let limit = std::fs::metadata(&path).unwrap().len() + 3;
        let full = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        full.set_len(limit).unwrap();
        // Simulate a partial record left by a short write, as the kernel leaves it.
        log.len = limit - 3;
        let cut = log.cut_back();
        assert!(cut.contains("cut back"), "{cut}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), limit - 3);
        assert_eq!(log.append(b"{\"a\":2}").unwrap(), 2);
        let (lines, torn) = read_jsonl(&path, false).unwrap();
        assert_eq!((lines.len(), torn), (2, None));
        let parsed: Vec<serde_json::Value> = parse_jsonl(&path, &lines).unwrap();
        assert_eq!(parsed[1]["a"], 2);
        let bad = parse_jsonl::<serde_json::Value>(&path, &["{\"a\":".into()]).unwrap_err();
        assert!(
            bad.to_string()
                .contains("log.jsonl: line 1: not valid JSON"),
            "{bad}"
        );
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(
            temporary_beside(&path)
                .to_string_lossy()
                .ends_with(TEMPORARY_SUFFIX)
        );
    }
}
