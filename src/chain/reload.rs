//! Hot reload: the current rule set, and the watcher that replaces it when
//! chain or converter files change.
//!
//! The watcher watches directories, not files (editors save by writing a
//! new file and renaming it over the old one), waits until a burst of
//! changes has been quiet for the debounce time, and then loads and
//! validates the whole set again. A valid set is swapped in at once: new
//! messages take it, messages in flight finish with the set they entered
//! with. An invalid set keeps the running one, logs one ERROR line with
//! every problem, and is tried again at the next change. A slow poll of the
//! same files backs the watcher up where file events do not arrive (network
//! file systems, directories replaced as a whole).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::ArbiterHandle;
use notify::Watcher as _;
use serde::Serialize;

use super::set::{self, RuleSet, SetConfig, SetSource};
use super::Services;

/// The set new messages enter with.
#[derive(Default)]
pub struct Current(RwLock<Option<Arc<RuleSet>>>);

impl Current {
    pub fn get(&self) -> Option<Arc<RuleSet>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, set: Arc<RuleSet>) -> Option<Arc<RuleSet>> {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(set)
    }
}

/// The outcome of the last reload, for `/health` and the API.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStatus {
    /// Version of the running set (1 at start, +1 per reload).
    pub version: u64,
    /// When the running set was loaded (epoch ms).
    pub loaded_ms: i64,
    /// When a reload was last tried (epoch ms).
    pub attempt_ms: i64,
    /// Whether the last attempt succeeded.
    pub ok: bool,
    /// The problems of the last attempt, when it failed.
    pub error: Option<String>,
    /// What the last successful reload changed.
    pub changes: Vec<String>,
}

/// What a reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The files are those of the running set (or of the last rejected
    /// attempt): nothing to do.
    Unchanged,
    Swapped {
        version: u64,
        changes: Vec<String>,
    },
    Rejected(Vec<String>),
}

/// The running rule sets and how they are replaced.
pub struct Rules {
    config: SetConfig,
    services: Services,
    arbiters: Vec<ArbiterHandle>,
    status: Mutex<ReloadStatus>,
    /// One reload at a time; holds the fingerprint of the files last tried.
    attempt: Mutex<Fingerprint>,
    next_version: AtomicU64,
    /// How long the files must stay the same before they are loaded (the
    /// debounce time once watching), so that a file being written in place
    /// is not loaded half written.
    settle_ms: AtomicU64,
}

/// The files a set is made of, with a hash of each one's contents.
type Fingerprint = Vec<(PathBuf, u64)>;

impl Rules {
    /// Starts the first set (version 1). `services.current` becomes the
    /// handle every part reads the running set from.
    pub fn start(
        config: SetConfig,
        source: SetSource,
        services: Services,
        arbiters: Vec<ArbiterHandle>,
    ) -> Arc<Rules> {
        let set = Arc::new(RuleSet::start(source, 1, None, &services, &arbiters));
        let status = ReloadStatus {
            version: 1,
            loaded_ms: set.loaded_ms,
            attempt_ms: set.loaded_ms,
            ok: true,
            error: None,
            changes: Vec::new(),
        };
        services.current.replace(set);
        let fingerprint = fingerprint(&config);
        Arc::new(Rules {
            config,
            services,
            arbiters,
            status: Mutex::new(status),
            attempt: Mutex::new(fingerprint),
            next_version: AtomicU64::new(2),
            settle_ms: AtomicU64::new(0),
        })
    }

    pub fn current(&self) -> Arc<RuleSet> {
        self.services
            .current
            .get()
            .expect("a set is installed at start")
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads the files again and swaps the set in when they changed and
    /// are valid. Blocking (reads files, compiles scripts).
    pub fn reload(&self) -> Reloaded {
        let mut last = self.attempt.lock().unwrap_or_else(|e| e.into_inner());
        let settle = Duration::from_millis(self.settle_ms.load(Ordering::Relaxed));
        let mut now = fingerprint(&self.config);
        loop {
            if now == *last {
                return Reloaded::Unchanged;
            }
            if settle.is_zero() {
                break;
            }
            // Still being written? Load only what stays the same for a while.
            std::thread::sleep(settle);
            let again = fingerprint(&self.config);
            if again == now {
                break;
            }
            now = again;
        }
        *last = now;
        let current = self.current();
        let attempt_ms = crate::msg::now_millis();
        match set::load(&self.config, Some(&current)) {
            Ok(source) => self.swap(source, &current, attempt_ms),
            Err(problems) => {
                tracing::error!(
                    version = current.version,
                    problems = %problems.join("; "),
                    "rule set reload rejected; the running version stays"
                );
                let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                status.attempt_ms = attempt_ms;
                status.ok = false;
                status.error = Some(problems.join("\n"));
                Reloaded::Rejected(problems)
            }
        }
    }

    fn swap(&self, source: SetSource, current: &Arc<RuleSet>, attempt_ms: i64) -> Reloaded {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        let set = RuleSet::start(
            source,
            version,
            Some(current),
            &self.services,
            &self.arbiters,
        );
        let changes = set::changes(current, &set);
        if changes.is_empty() {
            // Only formatting-irrelevant files moved (e.g. an editor's
            // temporary file); the running set is the same.
            self.next_version.fetch_sub(1, Ordering::Relaxed);
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.attempt_ms = attempt_ms;
            status.ok = true;
            status.error = None;
            return Reloaded::Unchanged;
        }
        let loaded_ms = set.loaded_ms;
        self.services.current.replace(Arc::new(set));
        tracing::info!(version, changes = %changes.join(", "), "rule set reloaded");
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = ReloadStatus {
            version,
            loaded_ms,
            attempt_ms,
            ok: true,
            error: None,
            changes: changes.clone(),
        };
        Reloaded::Swapped { version, changes }
    }

    /// Watches the set's directories and reloads after each quiet burst of
    /// changes. The watcher stops when the returned handle is dropped.
    pub fn watch(self: &Arc<Self>, debounce: Duration, poll: Duration) -> WatchHandle {
        self.settle_ms
            .store(debounce.as_millis() as u64, Ordering::Relaxed);
        let (events, changes) = std::sync::mpsc::channel::<()>();
        let notifier = events.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = notifier.send(());
            }
        });
        let watcher = match watcher {
            Ok(mut watcher) => {
                for dir in set::watched_dirs(&self.config) {
                    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e,
                            "cannot watch the directory; its changes are found by polling");
                    }
                }
                Some(watcher)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; rule set changes are found by polling");
                None
            }
        };
        let rules = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || watch_loop(rules, changes, debounce, poll))
            .expect("the reload thread starts");
        WatchHandle {
            _watcher: watcher,
            _events: events,
        }
    }
}

/// Keeps the file watcher alive; dropping it ends the watch.
pub struct WatchHandle {
    _watcher: Option<notify::RecommendedWatcher>,
    _events: std::sync::mpsc::Sender<()>,
}

fn watch_loop(
    rules: std::sync::Weak<Rules>,
    changes: std::sync::mpsc::Receiver<()>,
    debounce: Duration,
    poll: Duration,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match changes.recv_timeout(poll) {
            // A change: wait until the burst is over.
            Ok(()) => loop {
                match changes.recv_timeout(debounce) {
                    Ok(()) => continue,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            },
            // The slow poll: the fingerprint tells whether anything moved.
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(rules) = rules.upgrade() else { return };
        rules.reload();
    }
}

/// Every file of the set with a hash of its contents (missing files count
/// as a hash of 0).
fn fingerprint(config: &SetConfig) -> Fingerprint {
    let mut files = set::chain_files(&config.chain_dir()).unwrap_or_default();
    files.push(config.root_chain.clone());
    for (_, uplink, downlink) in &config.converters {
        files.push(uplink.clone());
        files.extend(downlink.iter().cloned());
    }
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|file| {
            let hash = std::fs::read(&file)
                .map(|bytes| super::loader::content_hash(&String::from_utf8_lossy(&bytes)))
                .unwrap_or(0);
            (file, hash)
        })
        .collect()
}
