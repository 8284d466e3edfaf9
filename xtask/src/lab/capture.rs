//! Writes captured guest files into a fixture tree (`tests/fixtures/...`).
//!
//! The guest sends each file as a result record (path relative to its root, text
//! content); this only validates the paths and mirrors them below `dir`.

use std::path::{Component, Path};

use anyhow::{Context, bail};

pub fn write_tree(dir: &Path, files: &[(String, String)]) -> anyhow::Result<()> {
    if files.is_empty() {
        bail!("the guest captured no files");
    }
    for (rel, _) in files {
        if Path::new(rel)
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            bail!("refusing captured path {rel:?}");
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    for (rel, data) in files {
        let rel_path = Path::new(rel);
        let dst = dir.join(rel_path);
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&dst, data).with_context(|| format!("writing {}", dst.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_paths_and_refuses_escapes() {
        let dir = std::env::temp_dir().join(format!("lab-capture-test-{}", std::process::id()));
        write_tree(&dir, &[("proc/1/stat".into(), "1 (x) S".into())]).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("proc/1/stat")).unwrap(),
            "1 (x) S"
        );
        assert!(write_tree(&dir, &[("../x".into(), String::new())]).is_err());
        assert!(write_tree(&dir, &[("/etc/x".into(), String::new())]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
