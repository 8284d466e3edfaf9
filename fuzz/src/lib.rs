//! Shared pieces of the fuzz targets: turning fuzzer bytes into the text a parser reads,
//! and into a small file tree for the readers that take a root directory.
//!
//! Why a tree format: the sysfs and cgroup readers take a root directory (so tests read
//! fixture trees), and what they parse is spread over many small files whose names
//! matter (`node1/distance`, `hugepages-2048kB/nr_hugepages`). Fuzzing the files one by
//! one would miss the cross-file checks (a distance row shorter than the node list, a
//! node online without a `cpulist`). So such a target reads a text listing of files:
//!
//! ```text
//! >>> devices/system/node/online
//! 0-1
//! >>> devices/system/node/node0/distance
//! 10 21
//! ```
//!
//! which `cargo xtask fuzz` writes from the fixture trees as seeds, and which the fuzzer
//! mutates like any text (names included). Paths are kept relative and inside the
//! scratch root; a name the file system refuses is skipped.

use std::path::{Component, Path, PathBuf};

/// Header that starts a file in a tree listing.
pub const FILE_HEADER: &str = ">>> ";
/// At most this many files per input: bounds the work of one execution.
const MAX_FILES: usize = 128;
/// At most this many directory levels per file name.
const MAX_DEPTH: usize = 12;

/// The bytes as text, as `read_to_string` would give them when they are UTF-8; other
/// bytes are replaced so the parsers still see the rest.
pub fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Splits a tree listing into `(relative path, content)` pairs. Text before the first
/// header is ignored; unsafe names (absolute, `..`, too deep) are dropped.
pub fn parse_tree(listing: &str) -> Vec<(PathBuf, String)> {
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    let mut current: Option<(PathBuf, String)> = None;
    for line in listing.split_inclusive('\n') {
        if let Some(name) = line.strip_prefix(FILE_HEADER) {
            if let Some(done) = current.take() {
                files.push(done);
            }
            if files.len() >= MAX_FILES {
                break;
            }
            current = safe_relative(name.trim_end_matches('\n')).map(|p| (p, String::new()));
        } else if let Some((_, content)) = current.as_mut() {
            content.push_str(line);
        }
    }
    files.extend(current);
    files
}

fn safe_relative(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    let ok = !name.is_empty()
        && !name.contains('\0')
        && path.components().count() <= MAX_DEPTH
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| path.to_path_buf())
}

/// A fresh, empty scratch directory of this process (on tmpfs when there is one), the
/// same for every execution so that nothing piles up.
pub fn scratch_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("vmbalancer-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Writes a tree listing under a fresh scratch directory and returns the root. A file
/// whose name clashes with a directory of another entry is skipped.
pub fn materialize(listing: &str) -> PathBuf {
    let root = scratch_dir();
    for (rel, content) in parse_tree(listing) {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            if std::fs::create_dir_all(dir).is_err() {
                continue;
            }
        }
        let _ = std::fs::write(&path, content);
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_listing_round_trip_and_unsafe_names() {
        let files =
            parse_tree("junk\n>>> a/b\n1\n2\n>>> ../escape\nx\n>>> /abs\ny\n>>> c\n>>> d\nlast");
        assert_eq!(
            files,
            vec![
                (PathBuf::from("a/b"), "1\n2\n".to_string()),
                (PathBuf::from("c"), String::new()),
                (PathBuf::from("d"), "last".to_string()),
            ]
        );
    }
}
