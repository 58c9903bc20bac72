//! The one reader for the JSON files lora-doctor opens (`config.json`, `adapter_config.json`,
//! `model.safetensors.index.json`): read, parse, and on failure an error naming the file and
//! whether it could not be read or is not JSON. The callers' error types wrap it unchanged.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use thiserror::Error;

/// Why a JSON file could not be read.
#[derive(Debug, Error)]
pub enum JsonFileError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads and parses `path` as `T` (a `serde_json::Value` for free-form files).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, JsonFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| JsonFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| JsonFileError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_the_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("config.json");
        let err = read::<serde_json::Value>(&missing).expect_err("no file");
        assert!(matches!(err, JsonFileError::Io { .. }));
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::write(&missing, "{not json").expect("write");
        let err = read::<serde_json::Value>(&missing).expect_err("not JSON");
        assert!(err.to_string().contains("is not valid JSON"), "{err}");
        std::fs::write(&missing, r#"{"a": 1}"#).expect("write");
        let value: serde_json::Value = read(&missing).expect("JSON");
        assert_eq!(value["a"], 1);
    }
}
