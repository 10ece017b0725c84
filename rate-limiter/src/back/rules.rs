//! The rules in force, and the watcher that replaces them when `RULES_PATH` changes.
//!
//! Every decision reads the current [`RuleSet`] (an `Arc` clone under a read lock held for
//! no longer than that). The watcher polls the file (or the directory's `*.yaml` files)
//! every 250 ms; a change is read, validated as a whole and swapped in, so a rule change
//! applies within a second without a restart. Buckets are keyed by descriptor and limit
//! name, never by the limit's numbers, so no counter is reset. A file that does not
//! validate is refused with a log line naming the file, the line and the field, and the
//! rules in force stay; so is a directory left without rules files (a deploy that removes
//! the old files before copying the new ones in), unless `RULES_ALLOW_EMPTY` says that no
//! rules is what is meant.
//!
//! Polling rather than inotify: it sees a file replaced by a rename (how editors and
//! Kubernetes config maps change files) and a directory's files coming and going alike.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use domain::Policy;
use domain::rules::{MAX_RULES_FILE_BYTES, RuleSet};
use tokio_util::sync::CancellationToken;

/// How often the watcher looks at the rules files.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The rules in force, replaced as a whole.
pub struct Rules {
    current: RwLock<Arc<RuleSet>>,
    /// The built-in policy, the default domain's rule unless the files define it.
    builtin: Policy,
    /// Moves on every change: refusals remembered under older rules no longer hold.
    generation: AtomicU64,
    /// Whether no rules file at all is a rule set (`RULES_ALLOW_EMPTY`); else it is refused
    /// as a bad file would be.
    allow_empty: bool,
    /// The files as they were just before they were read at the start: the watcher's
    /// first look compares with this, so a change made while the limiter starts is seen.
    loaded: Fingerprint,
}

impl Rules {
    /// The built-in rule only (no `RULES_PATH`).
    pub fn builtin(policy: Policy) -> Self {
        Self {
            current: RwLock::new(Arc::new(RuleSet::builtin(policy))),
            builtin: policy,
            generation: AtomicU64::new(0),
            allow_empty: false,
            loaded: Fingerprint::new(),
        }
    }

    /// The rules read from `path` now; an error names the file, line and field. A
    /// directory without rules files is an error unless `allow_empty`: a deploy that
    /// empties it before copying the new files in must not drop every limit.
    pub fn load(path: &Path, policy: Policy, allow_empty: bool) -> anyhow::Result<Self> {
        let loaded = fingerprint_now(path);
        let set = read(path, allow_empty)?.with_default(policy);
        Ok(Self {
            current: RwLock::new(Arc::new(set)),
            builtin: policy,
            generation: AtomicU64::new(0),
            allow_empty,
            loaded,
        })
    }

    /// The rules in force.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// How many times the rules changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `set` (with the built-in rule unless it defines the default domain) in force.
    pub fn replace(&self, set: RuleSet) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Arc::new(set.with_default(self.builtin));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Watches `path` until `shutdown`: a changed file (since the load) is validated and
    /// applied, a bad one refused (logged) with the rules in force kept.
    pub fn spawn_watcher(self: &Arc<Self>, path: PathBuf, shutdown: CancellationToken) {
        let rules = Arc::downgrade(self);
        let mut seen = self.loaded.clone();
        tokio::spawn(async move {
            let mut every = kit::every::Every::new(POLL_INTERVAL, shutdown);
            while every.tick().await {
                let Some(rules) = rules.upgrade() else { return };
                let now = fingerprint(&path).await;
                if now == seen {
                    continue;
                }
                seen = now;
                let read_path = path.clone();
                let allow_empty = rules.allow_empty;
                match tokio::task::spawn_blocking(move || read(&read_path, allow_empty)).await {
                    Ok(Ok(set)) => {
                        rules.replace(set);
                        tracing::info!(path = %path.display(), "rules changed: applied");
                    }
                    Ok(Err(err)) => {
                        tracing::error!(path = %path.display(), error = %err, "rules changed but refused; the previous rules stay in force");
                    }
                    Err(err) => tracing::error!(error = %err, "rules reader failed"),
                }
            }
        });
    }
}

/// What identifies the files' contents: each file's name, length, modification time and
/// inode, and for files up to [`HASHED_BYTES`] a hash of the contents too (two writes of
/// the same length within one tick of the file system's clock leave the same time: a
/// change of `5` to `4` would go unseen without it).
type Fingerprint = Vec<(PathBuf, u64, Option<std::time::SystemTime>, u64, u64)>;

/// Files up to this size are hashed on every poll (rules files are a few KiB).
const HASHED_BYTES: u64 = 256 * 1024;

async fn fingerprint(path: &Path) -> Fingerprint {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || fingerprint_now(&path))
        .await
        .unwrap_or_default()
}

/// The files' fingerprint, read now (blocking).
fn fingerprint_now(path: &Path) -> Fingerprint {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let inode = meta.as_ref().map_or(0, |m| m.ino());
            let modified = meta.and_then(|m| m.modified().ok());
            let content = if len <= HASHED_BYTES {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                std::fs::read(&f).unwrap_or_default().hash(&mut hasher);
                hasher.finish()
            } else {
                0
            };
            (f, len, modified, inode, content)
        })
        .collect()
}

/// The rules files at `path`: the file itself, or a directory's `*.yaml` and `*.yml`
/// files, sorted by name.
fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml") | Some("yml")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads and validates every rules file at `path` (blocking); none at all is an error
/// unless `allow_empty`.
fn read(path: &Path, allow_empty: bool) -> anyhow::Result<RuleSet> {
    let mut texts = Vec::new();
    let files = files(path)?;
    if files.is_empty() && !allow_empty {
        anyhow::bail!(
            "{}: no rules file (*.yaml, *.yml): every limit would be dropped; set RULES_ALLOW_EMPTY=true to run with none",
            path.display()
        );
    }
    for file in files {
        let name = file.display().to_string();
        let len = std::fs::metadata(&file)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
            .len();
        if len > MAX_RULES_FILE_BYTES as u64 {
            anyhow::bail!(
                "{name}: {len} bytes; a rules file may hold at most {MAX_RULES_FILE_BYTES}"
            );
        }
        let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        texts.push((name, text));
    }
    Ok(RuleSet::from_files(&texts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE: &str = "domain: api\ndescriptors:\n  - key: user_id\n    rate_limit:\n      requests_per_unit: 5\n      unit: hour\n";

    fn user_limit(rules: &Rules) -> u64 {
        let set = rules.current();
        let rule = set.resolve("api", &[domain::descriptor::Descriptor::user("u1")])[0]
            .clone()
            .expect("the rule for user_id");
        rule.limits[0].spec.limit()
    }

    /// A change made between the load and the watcher's first look (a config map updated
    /// while the limiter starts, or a busy machine that runs the watcher late) is applied:
    /// the watcher starts from what was loaded, not from what it finds when it first runs.
    #[tokio::test]
    async fn a_change_made_while_the_watcher_starts_is_applied() {
        let dir = std::env::temp_dir().join(testkit::unique("rules-watch"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rules.yaml");
        std::fs::write(&path, FIVE).unwrap();
        let rules = Arc::new(Rules::load(&path, Policy::new(100, 10.0).unwrap(), false).unwrap());
        assert_eq!(user_limit(&rules), 5);
        let tmp = dir.join("rules.tmp");
        std::fs::write(&tmp, FIVE.replace(": 5", ": 4")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let shutdown = CancellationToken::new();
        rules.spawn_watcher(path.clone(), shutdown.clone());
        tokio::time::sleep(POLL_INTERVAL * 4).await;
        shutdown.cancel();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            user_limit(&rules),
            4,
            "the change made before the watcher's first look"
        );
    }
}
