//! Hugging Face Hub names (`org/name`) resolved offline, from the local hub cache.
//!
//! Only the cache's on-disk layout is read, never the network: a CI job or an air-gapped machine
//! downloads with `hf download` once and every later run is reproducible. The layout is the one
//! `huggingface_hub` writes:
//!
//! ```text
//! <cache>/models--<org>--<name>/refs/<revision>      a file holding a commit sha
//! <cache>/models--<org>--<name>/snapshots/<sha>/     the files at that commit
//! ```
//!
//! The cache folder is chosen as `huggingface_hub` chooses it: `HF_HUB_CACHE`, else the legacy
//! `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`.
//!
//! The rule for an input argument: a path that exists is a path; otherwise an argument shaped like
//! a repo id (exactly one `/`, repo-id characters) is looked up in the cache; anything else stays a
//! path and the command reports it as missing. The `hf-hub` crate is not used: it brings HTTP
//! clients and TLS for downloads we never make, and the read side of the layout is this file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

/// The revision a hub name means when `--revision` is not given.
pub const DEFAULT_REVISION: &str = "main";

/// The longest repo name the Hub accepts (huggingface_hub's `validate_repo_id`).
const MAX_NAME_LEN: usize = 96;

/// Errors resolving a hub name. Each says how to get the missing files.
#[derive(Debug, Error)]
pub enum HubError {
    #[error(
        "`{repo_id}` is neither a local path nor in the Hugging Face cache `{cache}`; download it \
         first with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`), or set \
         HF_HUB_CACHE / HF_HOME to the cache that holds it"
    )]
    NotCached { repo_id: String, cache: PathBuf },
    #[error(
        "`{repo_id}` is cached in `{repo_dir}` but not at revision `{revision}` (no refs/{revision} \
         and no snapshots/{revision}); download it with `hf download {repo_id} --revision {revision}`"
    )]
    RevisionNotCached {
        repo_id: String,
        revision: String,
        repo_dir: PathBuf,
    },
    #[error(
        "`{repo_id}` revision `{revision}` points at commit {sha}, but `{snapshot}` is missing; \
         download it again with `hf download {repo_id} --revision {revision}`"
    )]
    SnapshotMissing {
        repo_id: String,
        revision: String,
        sha: String,
        snapshot: PathBuf,
    },
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` does not hold a commit sha (found `{found}`)")]
    BadRef { path: PathBuf, found: String },
    #[error("`{revision}` is not a revision name (a branch, a tag or a 40-hex commit sha)")]
    BadRevision { revision: String },
    #[error(
        "`{repo_id}` is not a local path, and no Hugging Face cache folder is known (HOME, \
         HF_HOME and HF_HUB_CACHE are all unset)"
    )]
    NoCache { repo_id: String },
}

/// One input argument that named a hub repo, and the snapshot it resolved to (in the JSON report's
/// `inputs.hub`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubSnapshot {
    /// The flag that named it: `--base`, `--adapter`, `--merged` or `PATH`.
    pub flag: String,
    pub repo_id: String,
    pub revision: String,
    /// The commit the revision pointed at.
    pub sha: String,
    /// The snapshot folder used as the input path.
    pub path: String,
}

/// True for `org/name` with the Hub's repo-id characters: exactly one `/`, each part of ASCII
/// letters, digits, `-`, `_`, `.`, not starting or ending with `-` or `.`, without `--` or `..`.
pub fn looks_like_repo_id(text: &str) -> bool {
    let part_ok = |part: &str, max: usize| {
        !part.is_empty()
            && part.len() <= max
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
            && !part.contains("--")
            && !part.contains("..")
    };
    match text.split_once('/') {
        Some((org, name)) => part_ok(org, MAX_NAME_LEN) && part_ok(name, MAX_NAME_LEN),
        None => false,
    }
}

/// A 40-hex commit sha, as refs files hold and as `--revision` may be.
fn is_commit_sha(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A branch or tag name (possibly `refs/pr/1`) that stays inside `refs/`.
fn is_revision_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// The hub cache folder `huggingface_hub` would use, given a way to read environment variables.
/// None when not even a home folder is known.
pub fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    // An empty variable counts as unset: an empty path would silently mean the working folder.
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    set("HF_HUB_CACHE")
        .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| set("HF_HOME").map(|home| home.join("hub")))
        .or_else(|| set("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| set("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The hub cache folder for this process's environment.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name))
}

/// The snapshot folder of `repo_id` at `revision` in `cache`, and the commit sha it is.
pub fn snapshot(
    cache: &Path,
    repo_id: &str,
    revision: &str,
) -> Result<(String, PathBuf), HubError> {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(HubError::NotCached {
            repo_id: repo_id.to_string(),
            cache: cache.to_path_buf(),
        });
    }
    let ref_file = repo_dir.join("refs").join(revision);
    let sha = if ref_file.is_file() {
        let text = std::fs::read_to_string(&ref_file).map_err(|source| HubError::Io {
            path: ref_file.clone(),
            source,
        })?;
        let sha = text.trim();
        if !is_commit_sha(sha) {
            return Err(HubError::BadRef {
                path: ref_file,
                found: sha.chars().take(60).collect(),
            });
        }
        sha.to_string()
    } else if is_commit_sha(revision) {
        revision.to_string()
    } else {
        return Err(HubError::RevisionNotCached {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            repo_dir,
        });
    };
    let snapshot = repo_dir.join("snapshots").join(&sha);
    if !snapshot.is_dir() {
        if is_commit_sha(revision) && !ref_file.is_file() {
            return Err(HubError::RevisionNotCached {
                repo_id: repo_id.to_string(),
                revision: revision.to_string(),
                repo_dir,
            });
        }
        return Err(HubError::SnapshotMissing {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            sha,
            snapshot,
        });
    }
    Ok((sha, snapshot))
}

/// Applies the rule to one argument against an explicit cache folder: an existing path or a
/// non-repo-id is left alone (None); a repo id is replaced by its snapshot folder.
pub fn resolve_in(
    cache: Option<&Path>,
    flag: &str,
    arg: &mut PathBuf,
    revision: &str,
) -> Result<Option<HubSnapshot>, HubError> {
    let Some(repo_id) = arg.to_str().filter(|s| looks_like_repo_id(s)) else {
        return Ok(None);
    };
    if arg.exists() {
        return Ok(None);
    }
    let repo_id = repo_id.to_string();
    if !(is_commit_sha(revision) || is_revision_name(revision)) {
        return Err(HubError::BadRevision {
            revision: revision.to_string(),
        });
    }
    let Some(cache) = cache else {
        return Err(HubError::NoCache { repo_id });
    };
    let (sha, path) = snapshot(cache, &repo_id, revision)?;
    *arg = path;
    Ok(Some(HubSnapshot {
        flag: flag.to_string(),
        repo_id,
        revision: revision.to_string(),
        sha,
        path: arg.display().to_string(),
    }))
}

/// Resolves every input argument of a command (flag name, argument) against this process's cache;
/// returns the hub names found, in argument order.
pub fn resolve_all<'a>(
    inputs: impl IntoIterator<Item = (&'static str, &'a mut PathBuf)>,
    revision: &str,
) -> Result<Vec<HubSnapshot>, HubError> {
    let cache = cache_dir();
    let mut found = Vec::new();
    for (flag, arg) in inputs {
        if let Some(snapshot) = resolve_in(cache.as_deref(), flag, arg, revision)? {
            found.push(snapshot);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_recognised_by_shape() {
        for ok in [
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "user/my-lora",
            "a/b",
            "org_1/name.v2",
        ] {
            assert!(looks_like_repo_id(ok), "{ok}");
        }
        for bad in [
            "tiny-llama",
            "fixtures/models/tiny-llama",
            "/abs/path",
            "org/",
            "/name",
            "org/na me",
            "org/-name",
            "org/name.",
            "org/na--me",
            "org/na..me",
            "./adapter",
            "../adapter",
            "C:\\x/y",
        ] {
            assert!(!looks_like_repo_id(bad), "{bad}");
        }
        assert!(!looks_like_repo_id(&format!("org/{}", "n".repeat(97))));
    }

    #[test]
    fn revisions_stay_inside_refs() {
        assert!(is_revision_name("main"));
        assert!(is_revision_name("refs/pr/1"));
        assert!(is_revision_name("v1.0"));
        assert!(!is_revision_name("../x"));
        assert!(!is_revision_name("a//b"));
        assert!(!is_revision_name(""));
        assert!(is_commit_sha(&"ab".repeat(20)));
        assert!(!is_commit_sha(&"ab".repeat(19)));
    }

    #[test]
    fn the_cache_folder_follows_huggingface_hub_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all: &[(&str, &str)] = &[
            ("HF_HUB_CACHE", "/c"),
            ("HUGGINGFACE_HUB_CACHE", "/legacy"),
            ("HF_HOME", "/h"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(cache_dir_from(env(all)), Some(PathBuf::from("/c")));
        assert_eq!(
            cache_dir_from(env(&all[1..])),
            Some(PathBuf::from("/legacy"))
        );
        assert_eq!(
            cache_dir_from(env(&all[2..])),
            Some(PathBuf::from("/h/hub"))
        );
        assert_eq!(
            cache_dir_from(env(&all[3..])),
            Some(PathBuf::from("/x/huggingface/hub"))
        );
        assert_eq!(
            cache_dir_from(env(&all[4..])),
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        assert_eq!(cache_dir_from(env(&[("HF_HUB_CACHE", "")])), None);
    }
}
