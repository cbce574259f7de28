//! Reading the files the service is configured by (rules, query files, key files): regular files
//! only (never a symlink, device or FIFO, so a file in `queries/` cannot point the service at
//! `/proc/self/environ` or stall a reload on a pipe), at most [`MAX_CONFIG_BYTES`], UTF-8. Errors
//! name the file and, for TOML, the line and column, and never quote the file's content.

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

/// A TOML error as `line:column: message`, without the snippet of the source `toml` would quote.
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
    Error::Config(format!("{at}{}", e.message().trim()))
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
    if torn.is_some() && repair {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| refuse(path, &io_reason(&e)))?;
        file.set_len(complete as u64)
            .and_then(|_| file.sync_all())
            .map_err(|e| refuse(path, &io_reason(&e)))?;
    }
    let text = std::str::from_utf8(&bytes[..complete]).map_err(|_| refuse(path, "not UTF-8"))?;
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    Ok((lines, torn))
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
}
