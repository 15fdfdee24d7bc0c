//! Hugging Face model ids (`ORG/NAME`, `ORG/NAME@REVISION`), resolved offline from the local
//! hub cache by the hub's own rules (huggingface_hub's `constants.py` and `file_download.py`):
//! the cache folder from `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; a revision through
//! `models--ORG--NAME/refs/<revision>` (or a full commit hash as it is) to
//! `snapshots/<commit>/`, whose files are symlinks into `blobs/` (or copies, where the cache
//! could not make links). phlora never downloads: the hub's own tools fetch in parallel.
//!
//! A path that exists always wins over an id, so a local folder named like one is read as it is.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::checkpoint::{parse_index, INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};
use crate::names::{CONFIG_FILE, INDEX_FILE as ADAPTER_INDEX_FILE, MODEL_FILE as ADAPTER_FILE};

/// What a resolved folder must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A model checkpoint: `model.safetensors`, or an index and every shard it names.
    Model,
    /// A PEFT adapter: `adapter_config.json` and its weights (one file, or an index and shards).
    Adapter,
}

/// A model id as the hub writes it, with the revision asked for (`main` when none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    /// `ORG/NAME` or `ORG/NAME@REVISION`, by huggingface_hub's `validate_repo_id`: letters,
    /// digits, `-`, `_`, `.`; no `--` or `..`; not starting or ending with `-` or `.`; at
    /// most 96 characters. A bare `NAME` is not taken: it reads as a relative path.
    pub fn parse(s: &str) -> Option<HubId> {
        let (repo, revision) = match s.split_once('@') {
            // A revision is a ref path under refs/ (`main`, `refs/pr/1`) or a hash: never
            // one that leaves the cache.
            Some((r, rev))
                if !rev.is_empty()
                    && !rev.contains("..")
                    && !rev.starts_with('/')
                    && !rev.contains(['\\', '\0']) =>
            {
                (r, Some(rev))
            }
            Some(_) => return None,
            None => (s, None),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        };
        let ok = part_ok(org)
            && part_ok(name)
            && repo.len() <= 96
            && !repo.contains("--")
            && !repo.contains("..")
            && !repo.ends_with(".git");
        ok.then(|| HubId {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// The command that fetches what is missing, with the hub's own CLI.
    fn download_command(&self, revision: Option<&str>) -> String {
        let rev = revision
            .or(self.revision.as_deref())
            .map(|r| format!(" --revision {r}"))
            .unwrap_or_default();
        format!(
            "hf download {}{rev}   (huggingface_hub ≥ 0.34; `huggingface-cli download` with older ones)",
            self.repo
        )
    }
}

impl fmt::Display for HubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.revision {
            Some(r) => write!(f, "{}@{r}", self.repo),
            None => write!(f, "{}", self.repo),
        }
    }
}

/// Where a model argument points: a local path, or a snapshot of the hub cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub {
        id: HubId,
        /// The commit the revision names (what an adapter records as `revision`).
        commit: String,
        snapshot: PathBuf,
    },
}

impl ModelSource {
    /// The folder or file to read.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Local(p) => p,
            ModelSource::Hub { snapshot, .. } => snapshot,
        }
    }

    /// The hub id and commit, when the model came from the hub.
    pub fn hub(&self) -> Option<(&str, &str)> {
        match self {
            ModelSource::Local(_) => None,
            ModelSource::Hub { id, commit, .. } => Some((&id.repo, commit)),
        }
    }
}

/// The hub cache folder, and which rule chose it (for messages).
#[derive(Clone, Debug)]
pub struct HubCache {
    pub dir: PathBuf,
    pub chosen_by: String,
}

impl HubCache {
    /// The hub's rules over the process environment.
    pub fn from_env() -> HubCache {
        Self::from_vars(|k| std::env::var_os(k))
    }

    /// The hub's rules over any environment (an unset or empty variable is not set).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> HubCache {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let home = || get("HOME").map(PathBuf::from).unwrap_or_else(|| "/".into());
        // The hub's os.path.expandvars(os.path.expanduser(value)).
        let expand = |v: OsString| -> PathBuf {
            let v = match v.to_str() {
                Some(s) => OsString::from(expand_vars(s, &var)),
                None => v,
            };
            match v.to_str().and_then(|s| s.strip_prefix("~/")) {
                Some(rest) => home().join(rest),
                None if v == "~" => home(),
                None => PathBuf::from(v),
            }
        };
        // HUGGINGFACE_HUB_CACHE is the hub's older name for HF_HUB_CACHE, still read.
        for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
            if let Some(v) = get(k) {
                let dir = expand(v);
                return HubCache {
                    chosen_by: format!("{k}={}", dir.display()),
                    dir,
                };
            }
        }
        if let Some(v) = get("HF_HOME") {
            let dir = expand(v).join("hub");
            return HubCache {
                chosen_by: "HF_HOME/hub, HF_HUB_CACHE unset".into(),
                dir,
            };
        }
        if let Some(v) = get("XDG_CACHE_HOME") {
            return HubCache {
                dir: expand(v).join("huggingface/hub"),
                chosen_by: "$XDG_CACHE_HOME/huggingface/hub, HF_HUB_CACHE and HF_HOME unset".into(),
            };
        }
        HubCache {
            dir: home().join(".cache/huggingface/hub"),
            chosen_by: "the default; HF_HUB_CACHE, HF_HOME and XDG_CACHE_HOME unset".into(),
        }
    }

    /// A model argument: an existing path as it is, else a hub id from this cache.
    pub fn resolve(&self, arg: &Path, expect: Expect) -> Result<ModelSource> {
        if arg.symlink_metadata().is_ok() {
            return Ok(ModelSource::Local(arg.to_path_buf()));
        }
        let Some(id) = arg.to_str().and_then(HubId::parse) else {
            return Err(Error::io(
                arg,
                "cannot open",
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or folder (nor a Hugging Face id: ORG/NAME or ORG/NAME@REVISION)",
                ),
            ));
        };
        self.snapshot(&id, expect)
    }

    /// `id`'s snapshot folder, checked to hold what `expect` needs.
    pub fn snapshot(&self, id: &HubId, expect: Expect) -> Result<ModelSource> {
        let repo_dir = self
            .dir
            .join(format!("models--{}", id.repo.replace('/', "--")));
        let fail = |reason: String| Error::Hub {
            id: id.to_string(),
            reason,
        };
        if !repo_dir.is_dir() {
            return Err(fail(format!(
                "not a local path, and not in the Hugging Face cache: no {} (cache chosen by {}). phlora does not download; fetch it with: {}",
                repo_dir.display(),
                self.chosen_by,
                id.download_command(None)
            )));
        }
        let commit = self.commit_of(id, &repo_dir)?;
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(fail(format!(
                "revision `{}` names commit {commit}, but {} is not in the cache (an interrupted download?); fetch it with: {}",
                id.revision(),
                snapshot.display(),
                id.download_command(Some(&commit))
            )));
        }
        check_complete(&snapshot, expect).map_err(|missing| {
            fail(format!(
                "the cached snapshot {} is incomplete: {missing}; fetch the rest with: {}",
                snapshot.display(),
                id.download_command(Some(&commit))
            ))
        })?;
        tracing::debug!("{id}: commit {commit}, {}", snapshot.display());
        Ok(ModelSource::Hub {
            id: id.clone(),
            commit,
            snapshot,
        })
    }

    /// The commit a revision names: `refs/<revision>` when the cache has it, else the
    /// revision itself when it is a full commit hash (as the hub reads it offline).
    fn commit_of(&self, id: &HubId, repo_dir: &Path) -> Result<String> {
        let revision = id.revision();
        // The hub's REGEX_COMMIT_HASH: 40 lower-case hex digits (anything else is a ref name).
        let is_hash = |s: &str| {
            s.len() == 40
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if is_hash(revision) {
            return Ok(revision.to_string());
        }
        let ref_path = repo_dir.join("refs").join(revision);
        let fail = |reason: String| Error::Hub {
            id: id.to_string(),
            reason,
        };
        let text = match std::fs::read_to_string(&ref_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(format!(
                    "the cache has this model but not revision `{revision}` (no {}; a commit is named by its full 40-digit hash); fetch it with: {}",
                    ref_path.display(),
                    id.download_command(Some(revision))
                )))
            }
            Err(e) => return Err(Error::io(&ref_path, "cannot read the hub cache's ref", e)),
        };
        let commit = text.trim();
        if !is_hash(commit) {
            return Err(fail(format!(
                "{} does not hold a commit hash (it holds {:?})",
                ref_path.display(),
                commit.chars().take(60).collect::<String>()
            )));
        }
        Ok(commit.to_string())
    }
}

/// Python's os.path.expandvars: `$NAME` and `${NAME}` replaced by set variables, anything
/// else (an unset name, a lone `$`) left as it is.
fn expand_vars(s: &str, var: &impl Fn(&str) -> Option<OsString>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match (
            name.is_empty(),
            var(name).and_then(|v| v.into_string().ok()),
        ) {
            (false, Some(value)) => out.push_str(&value),
            _ => out.push_str(&rest[at..at + 1 + len]),
        }
        rest = &rest[at + 1 + len..];
    }
    out.push_str(rest);
    out
}

/// What `expect` needs that `dir` lacks (a file, a shard the index names, a broken link).
fn check_complete(dir: &Path, expect: Expect) -> std::result::Result<(), String> {
    let (single, index, what) = match expect {
        Expect::Model => (SINGLE_FILE, INDEX_FILE, "model"),
        Expect::Adapter => {
            present(dir, CONFIG_FILE)?.ok_or_else(|| format!("no {CONFIG_FILE}"))?;
            (ADAPTER_FILE, ADAPTER_INDEX_FILE, "adapter")
        }
    };
    if present(dir, index)?.is_some() {
        let path = dir.join(index);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{index}: {e}"))?;
        let map = parse_index(&path, &text).map_err(|e| e.to_string())?;
        let mut shards: Vec<&String> = map.values().collect();
        shards.sort();
        shards.dedup();
        let missing: Vec<&str> = shards
            .iter()
            .filter(|s| !matches!(present(dir, s), Ok(Some(_))))
            .map(|s| s.as_str())
            .collect();
        return match missing[..] {
            [] => Ok(()),
            _ => Err(format!(
                "{index} names {} shards, and {} of them are missing or broken links: {}",
                shards.len(),
                missing.len(),
                missing.join(", ")
            )),
        };
    }
    if present(dir, single)?.is_some() {
        return Ok(());
    }
    Err(format!(
        "no {what} weights ({single} or {index}; phlora reads safetensors, not .bin)"
    ))
}

/// `Some` when `name` in `dir` is a file (through its symlink), `None` when absent, and an
/// error naming the blob when it is a link whose target is gone.
fn present(dir: &Path, name: &str) -> std::result::Result<Option<()>, String> {
    let path = dir.join(name);
    match (path.symlink_metadata(), path.metadata()) {
        (Err(_), _) => Ok(None),
        (Ok(_), Ok(m)) if m.is_file() => Ok(Some(())),
        (Ok(_), Ok(_)) => Err(format!("{name} is not a file")),
        (Ok(_), Err(_)) => {
            let target = std::fs::read_link(&path)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            Err(format!(
                "{name} is a broken link (to {target}: its blob is not in the cache)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const OTHER: &str = "89abcdef0123456789abcdef0123456789abcdef";

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn ids_parse_by_the_hubs_rules() {
        let id = HubId::parse("meta-llama/Llama-3.2-1B").unwrap();
        assert_eq!(id.repo, "meta-llama/Llama-3.2-1B");
        assert_eq!(id.revision, None);
        let id = HubId::parse("Qwen/Qwen2.5-0.5B@refs/pr/3").unwrap();
        assert_eq!(id.revision.as_deref(), Some("refs/pr/3"));
        for bad in [
            "gpt2",
            "a/b/c",
            "./x/y",
            "/abs/path",
            "org/na--me",
            "org/-name",
            "org/name.",
            "org/name.git",
            "org/na me",
            "org/name@",
            "org/name@../../etc",
            "org/name@/etc/passwd",
            "",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
        assert_eq!(HubId::parse(&format!("o/{}", "n".repeat(95))), None);
    }

    #[test]
    fn cache_folder_follows_the_hubs_order() {
        let dir = |v: &[(&str, &str)]| HubCache::from_vars(env(v)).dir;
        let all = [
            ("HF_HUB_CACHE", "/c"),
            ("HF_HOME", "/h"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(dir(&all), PathBuf::from("/c"));
        assert_eq!(dir(&all[1..]), PathBuf::from("/h/hub"));
        assert_eq!(dir(&all[2..]), PathBuf::from("/x/huggingface/hub"));
        assert_eq!(
            dir(&all[3..]),
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        assert_eq!(
            dir(&[("HUGGINGFACE_HUB_CACHE", "/old"), ("HF_HOME", "/h")]),
            PathBuf::from("/old")
        );
        // `$VAR` and `${VAR}` expand as the hub's expandvars does; unset names stay.
        assert_eq!(
            dir(&[
                ("HF_HOME", "$SCRATCH/${USER}/hf-$NOPE"),
                ("SCRATCH", "/s"),
                ("USER", "u")
            ]),
            PathBuf::from("/s/u/hf-$NOPE/hub")
        );
        // Empty is unset; `~` expands as the hub's expanduser does.
        assert_eq!(
            dir(&[
                ("HF_HUB_CACHE", ""),
                ("HF_HOME", "~/hf"),
                ("HOME", "/home/u")
            ]),
            PathBuf::from("/home/u/hf/hub")
        );
    }

    /// A cache with `models--org--m`, `refs/main` → COMMIT, the given files in its snapshot
    /// as symlinks into blobs/ (`linked`) or as copies.
    fn cache_with(files: &[(&str, &str)], linked: bool) -> (tempfile::TempDir, HubCache) {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--m");
        let snap = repo.join("snapshots").join(COMMIT);
        fs::create_dir_all(&snap).unwrap();
        fs::create_dir_all(repo.join("blobs")).unwrap();
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::write(repo.join("refs/main"), COMMIT).unwrap();
        for (i, (name, text)) in files.iter().enumerate() {
            if linked {
                let blob = repo.join("blobs").join(format!("blob{i}"));
                fs::write(&blob, text).unwrap();
                std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(name))
                    .unwrap();
            } else {
                fs::write(snap.join(name), text).unwrap();
            }
        }
        let cache = HubCache {
            dir: tmp.path().to_path_buf(),
            chosen_by: "test".into(),
        };
        (tmp, cache)
    }

    fn hub_err(r: Result<ModelSource>) -> String {
        match r {
            Err(e @ Error::Hub { .. }) => e.to_string(),
            other => panic!("expected a hub error, got {other:?}"),
        }
    }

    const INDEX: &str = r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#;

    #[test]
    fn resolves_linked_and_copied_snapshots() {
        for linked in [true, false] {
            let files = [
                ("config.json", "{}"),
                (INDEX_FILE, INDEX),
                ("s1.safetensors", "x"),
                ("s2.safetensors", "y"),
            ];
            let (tmp, cache) = cache_with(&files, linked);
            let src = cache.resolve(Path::new("org/m"), Expect::Model).unwrap();
            let snap = tmp.path().join("models--org--m/snapshots").join(COMMIT);
            assert_eq!(src.path(), snap);
            assert_eq!(src.hub(), Some(("org/m", COMMIT)));
            // A full commit hash, and a branch through its ref file.
            let by_hash = cache
                .resolve(Path::new(&format!("org/m@{COMMIT}")), Expect::Model)
                .unwrap();
            assert_eq!(by_hash.path(), snap);
            fs::write(
                tmp.path().join("models--org--m/refs/dev"),
                format!("{COMMIT}\n"),
            )
            .unwrap();
            let by_ref = cache
                .resolve(Path::new("org/m@dev"), Expect::Model)
                .unwrap();
            assert_eq!(by_ref.hub(), Some(("org/m", COMMIT)));
        }
    }

    #[test]
    fn an_existing_path_wins_over_an_id() {
        let (tmp, cache) = cache_with(&[(SINGLE_FILE, "x")], true);
        let local = tmp.path().join("org/m");
        fs::create_dir_all(&local).unwrap();
        let src = cache.resolve(&local, Expect::Model).unwrap();
        assert_eq!(src, ModelSource::Local(local));
    }

    #[test]
    fn what_is_missing_is_named_with_the_command_that_fetches_it() {
        let (tmp, cache) = cache_with(&[(INDEX_FILE, INDEX), ("s1.safetensors", "x")], true);
        let e = hub_err(cache.resolve(Path::new("org/m"), Expect::Model));
        assert!(
            e.contains("incomplete") && e.contains("s2.safetensors"),
            "{e}"
        );
        assert!(
            e.contains(&format!("hf download org/m --revision {COMMIT}")),
            "{e}"
        );

        // A broken link: the blob went away.
        let snap = tmp.path().join("models--org--m/snapshots").join(COMMIT);
        std::os::unix::fs::symlink("../../blobs/gone", snap.join("s2.safetensors")).unwrap();
        let e = hub_err(cache.resolve(Path::new("org/m"), Expect::Model));
        assert!(e.contains("s2.safetensors"), "{e}");

        let e = hub_err(cache.resolve(Path::new("org/other"), Expect::Model));
        assert!(
            e.contains("models--org--other") && e.contains("hf download org/other"),
            "{e}"
        );
        let e = hub_err(cache.resolve(Path::new("org/m@v2"), Expect::Model));
        assert!(
            e.contains("revision `v2`") && e.contains("--revision v2"),
            "{e}"
        );

        // A ref naming a snapshot that is not there.
        fs::write(tmp.path().join("models--org--m/refs/old"), OTHER).unwrap();
        let e = hub_err(cache.resolve(Path::new("org/m@old"), Expect::Model));
        assert!(e.contains(OTHER) && e.contains("not in the cache"), "{e}");
        // A ref holding something else.
        fs::write(tmp.path().join("models--org--m/refs/bad"), "oops").unwrap();
        let e = hub_err(cache.resolve(Path::new("org/m@bad"), Expect::Model));
        assert!(e.contains("does not hold a commit hash"), "{e}");
    }

    #[test]
    fn a_broken_single_file_and_pytorch_only_snapshots_are_refused() {
        let (tmp, cache) = cache_with(&[("pytorch_model.bin", "x")], true);
        let e = hub_err(cache.resolve(Path::new("org/m"), Expect::Model));
        assert!(e.contains("not .bin"), "{e}");
        let snap = tmp.path().join("models--org--m/snapshots").join(COMMIT);
        std::os::unix::fs::symlink("../../blobs/gone", snap.join(SINGLE_FILE)).unwrap();
        let e = hub_err(cache.resolve(Path::new("org/m"), Expect::Model));
        assert!(e.contains("broken link"), "{e}");
    }

    #[test]
    fn adapters_need_their_config() {
        let (_tmp, cache) = cache_with(&[(ADAPTER_FILE, "x")], false);
        let e = hub_err(cache.resolve(Path::new("org/m"), Expect::Adapter));
        assert!(e.contains(CONFIG_FILE), "{e}");
        let (_tmp, cache) = cache_with(&[(ADAPTER_FILE, "x"), (CONFIG_FILE, "{}")], false);
        assert!(cache.resolve(Path::new("org/m"), Expect::Adapter).is_ok());
    }

    #[test]
    fn a_missing_path_that_is_no_id_says_both() {
        let cache = HubCache {
            dir: "/nonexistent".into(),
            chosen_by: "test".into(),
        };
        let e = cache
            .resolve(Path::new("./no/such/model"), Expect::Model)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such file") && e.contains("ORG/NAME"), "{e}");
    }
}
