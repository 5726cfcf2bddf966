//! The state file: allocations persisted across restarts, written atomically (temporary
//! file, fsync, rename, fsync of the folder), so a crash leaves the old file or the new one,
//! never a torn one.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Format version written into the file.
pub const STATE_VERSION: u32 = 1;

/// What is persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Format version.
    pub version: u32,
    /// Service `namespace/name` → its addresses.
    pub allocations: BTreeMap<String, Vec<IpAddr>>,
}

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file cannot be read or written.
    #[error("state file {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a state file of this version.
    #[error("state file {path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Reads the state file; a missing file is an empty state.
///
/// # Errors
/// The file exists but cannot be read or is not a state file.
pub fn load(path: &Path) -> Result<SavedState, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SavedState::default()),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                op: "read",
                source,
            })
        }
    };
    let state: SavedState = serde_json::from_str(&text).map_err(|e| StateError::Invalid {
        path: path.to_owned(),
        problem: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(StateError::Invalid {
            path: path.to_owned(),
            problem: format!(
                "version = {}: this build reads version {STATE_VERSION}",
                state.version
            ),
        });
    }
    Ok(state)
}

/// Writes the state file atomically.
///
/// # Errors
/// Any step of writing fails; the previous file is then left as it was.
pub fn save(path: &Path, allocations: &BTreeMap<String, Vec<IpAddr>>) -> Result<(), StateError> {
    let io = |op| {
        move |source| StateError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io("create folder"))?;
    let state = SavedState {
        version: STATE_VERSION,
        allocations: allocations.clone(),
    };
    let mut text = serde_json::to_vec_pretty(&state).map_err(|e| StateError::Invalid {
        path: path.to_owned(),
        problem: e.to_string(),
    })?;
    text.push(b'\n');
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io("create temporary file"))?;
        f.write_all(&text).map_err(io("write"))?;
        f.sync_all().map_err(io("fsync"))?;
        std::fs::rename(&tmp, path).map_err(io("rename"))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync folder"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_allocations_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("state.json");
        assert_eq!(load(&path).unwrap(), SavedState::default());
        let mut a = BTreeMap::new();
        a.insert(
            "default/web".to_owned(),
            vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        );
        save(&path, &a).unwrap();
        let s = load(&path).unwrap();
        assert_eq!(s.allocations, a);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{\"version\": 7, \"allocations\": {}}").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("state.json") && e.contains("version = 7"), "{e}");
    }
}
