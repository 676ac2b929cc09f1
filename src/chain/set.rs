//! A rule set: every chain of the rule chain directory and every
//! integration's converters, loaded and validated together as one version.
//!
//! Messages keep the set they entered with (see the module docs of
//! [`super`]). Loading a set reads all `*.json` files beside the root
//! chain, checks each file, then what spans files: chain ids are unique,
//! every rule chain node names a chain of the set, its connections use the
//! called chain's output names, chains do not call each other in a cycle,
//! and every script compiles. Every problem is reported, one line each,
//! with the file and the node. Building a set from a previous one keeps
//! the actors of every chain whose file did not change, and the compiled
//! converters whose text did not change.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::ArbiterHandle;
use petgraph::graph::DiGraph;

use super::loader::{self, ChainDef, UnknownNodes};
use super::nodes::NodeKind;
use super::{Envelope, RuleEngine, Services};
use crate::convert::js::JsLimits;
use crate::convert::{Script, ScriptKind};
use crate::delivery::Ticket;
use crate::msg::TbMsg;

/// Where a set's files are and how to judge them.
#[derive(Debug, Clone)]
pub struct SetConfig {
    pub root_chain: PathBuf,
    pub unknown_nodes: UnknownNodes,
    pub limits: JsLimits,
    /// (integration name, uplink converter, downlink converter).
    pub converters: Vec<(String, PathBuf, Option<PathBuf>)>,
}

impl SetConfig {
    pub fn from_config(config: &crate::config::Config) -> SetConfig {
        SetConfig {
            root_chain: config.root_chain.clone(),
            unknown_nodes: config.rules.unknown_nodes,
            limits: crate::service::js_limits(config),
            converters: config
                .integrations
                .iter()
                .map(|i| {
                    (
                        i.name.clone(),
                        i.uplink_converter.clone(),
                        i.downlink_converter.clone(),
                    )
                })
                .collect(),
        }
    }

    /// The directory of the chains.
    pub fn chain_dir(&self) -> PathBuf {
        match self.root_chain.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

/// The validated contents of a set, before its actors run.
pub struct SetSource {
    pub chains: Vec<ChainDef>,
    pub root: usize,
    pub decoders: HashMap<String, Arc<Script>>,
    pub encoders: HashMap<String, Arc<Script>>,
}

/// A running set; see the module docs.
pub struct RuleSet {
    pub version: u64,
    pub loaded_ms: i64,
    pub chains: Vec<Arc<RuleEngine>>,
    pub root: usize,
    /// Chain index by id, file stem, and (when unique) name.
    aliases: HashMap<String, usize>,
    /// Uplink converters by integration name.
    pub decoders: HashMap<String, Arc<Script>>,
    /// Downlink converters by integration name.
    pub encoders: HashMap<String, Arc<Script>>,
}

impl RuleSet {
    /// Starts the chains of `source`, reusing those of `previous` whose
    /// file did not change.
    pub fn start(
        source: SetSource,
        version: u64,
        previous: Option<&RuleSet>,
        services: &Services,
        arbiters: &[ArbiterHandle],
    ) -> RuleSet {
        let aliases = aliases(&source.chains);
        let chains = source
            .chains
            .into_iter()
            .map(|def| {
                let kept = previous.and_then(|p| {
                    p.chains
                        .iter()
                        .find(|c| c.def.file == def.file && c.def.content_hash == def.content_hash)
                });
                match kept {
                    Some(engine) => engine.clone(),
                    None => Arc::new(RuleEngine::start(def, version, services.clone(), arbiters)),
                }
            })
            .collect();
        RuleSet {
            version,
            loaded_ms: crate::msg::now_millis(),
            chains,
            root: source.root,
            aliases,
            decoders: source.decoders,
            encoders: source.encoders,
        }
    }

    pub fn root(&self) -> &Arc<RuleEngine> {
        &self.chains[self.root]
    }

    /// The chain known as `key` (id, file name without `.json`, or name).
    pub fn chain(&self, key: &str) -> Option<&Arc<RuleEngine>> {
        self.aliases.get(key).map(|&i| &self.chains[i])
    }

    /// Hands a message to the root chain, with this set.
    pub fn submit(self: &Arc<Self>, msg: TbMsg, ticket: Ticket) {
        self.root().enter(Envelope {
            msg,
            ticket,
            set: self.clone(),
            frames: None,
        });
    }
}

fn aliases(chains: &[ChainDef]) -> HashMap<String, usize> {
    let mut aliases = HashMap::new();
    let mut names: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, def) in chains.iter().enumerate() {
        names.entry(def.name.as_str()).or_default().push(i);
    }
    for (name, indices) in names {
        if let [only] = indices.as_slice() {
            aliases.insert(name.to_string(), *only);
        }
    }
    for (i, def) in chains.iter().enumerate() {
        aliases.insert(def.stem.clone(), i);
    }
    for (i, def) in chains.iter().enumerate() {
        aliases.insert(def.id.clone(), i);
    }
    aliases
}

/// The chain files of a directory: `*.json`, not hidden, sorted.
pub fn chain_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = named_like_chains(dir)?
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The entries of a directory named like chain files: `*.json`, not hidden.
fn named_like_chains(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("rule chain directory {}: cannot read: {e}", dir.display()))?;
    Ok(entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect())
}

/// Entries of the chain directory named like chain files that are not
/// regular files (a dangling or looping link, a directory, a device): not
/// read, but reported, so they are not left out unnoticed.
fn odd_chain_entries(dir: &Path) -> Vec<String> {
    let mut problems: Vec<String> = named_like_chains(dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => None,
            Ok(_) => Some(format!(
                "{}: not a regular file (a directory or device); not loaded",
                p.display()
            )),
            Err(e) => Some(format!("{}: cannot be read ({e}); not loaded", p.display())),
        })
        .collect();
    problems.sort();
    problems
}

/// Largest chain file read.
const MAX_CHAIN_FILE_BYTES: u64 = 16 << 20;

/// Loads and validates a set. `previous` lends its parsed chains and
/// compiled converters where the files did not change, so they are not
/// checked again. Returns every problem, one line each.
pub fn load(config: &SetConfig, previous: Option<&RuleSet>) -> Result<SetSource, Vec<String>> {
    let mut problems = Vec::new();
    let dir = config.chain_dir();
    let mut files = chain_files(&dir).unwrap_or_else(|e| {
        problems.push(e);
        Vec::new()
    });
    problems.extend(odd_chain_entries(&dir));
    if !files.iter().any(|f| same_file(f, &config.root_chain)) {
        files.push(config.root_chain.clone());
    }

    // Chains with problems stay in the checks across files (their
    // references, scripts and ids), so one run reports everything.
    let mut chains = Vec::new();
    let mut broken = Vec::new();
    let mut unreadable = Vec::new();
    let mut fresh = Vec::new();
    for file in &files {
        match load_chain(file, config.unknown_nodes, previous) {
            Ok(Loaded::Kept(def)) => chains.push(def),
            Ok(Loaded::Parsed(def, file_problems)) if file_problems.is_empty() => {
                fresh.push(chains.len());
                chains.push(def);
            }
            Ok(Loaded::Parsed(def, file_problems)) => {
                problems.extend(
                    loader::ChainError {
                        file: file.clone(),
                        problems: file_problems,
                    }
                    .lines(),
                );
                broken.push(def);
            }
            Err(e) => {
                problems.extend(e.lines());
                unreadable.push(file.clone());
            }
        }
    }
    let root = chains
        .iter()
        .position(|c| same_file(&c.file, &config.root_chain));
    let root_reported = problems
        .iter()
        .any(|p| p.contains(&display(&config.root_chain)));
    if root.is_none() && !root_reported {
        problems.push(format!(
            "rule chain {}: the root chain is missing",
            config.root_chain.display()
        ));
    }

    let valid = chains.len();
    let mut all = chains;
    all.extend(broken);
    problems.extend(check_references(&all, valid, &unreadable));
    let fresh: Vec<usize> = fresh.into_iter().chain(valid..all.len()).collect();
    problems.extend(check_scripts(&all, &fresh, config.limits));
    all.truncate(valid);
    let chains = all;
    let (decoders, encoders) = load_converters(config, previous, &mut problems);

    match (problems.is_empty(), root) {
        (true, Some(root)) => Ok(SetSource {
            chains,
            root,
            decoders,
            encoders,
        }),
        _ => Err(problems),
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
}

enum Loaded {
    /// The previous set's parse of the same text.
    Kept(ChainDef),
    /// Parsed now, with the file's own problems.
    Parsed(ChainDef, Vec<loader::ChainProblem>),
}

/// A chain file, parsed (or the previous set's parse of the same text).
fn load_chain(
    file: &Path,
    unknown: UnknownNodes,
    previous: Option<&RuleSet>,
) -> Result<Loaded, loader::ChainError> {
    let size = std::fs::metadata(file)
        .map_err(|e| loader::ChainError::single(file, format!("cannot read the file: {e}")))?
        .len();
    if size > MAX_CHAIN_FILE_BYTES {
        return Err(loader::ChainError::single(
            file,
            format!(
                "the file has {size} bytes, more than a rule chain may ({MAX_CHAIN_FILE_BYTES})"
            ),
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| loader::ChainError::single(file, format!("cannot read the file: {e}")))?;
    let hash = loader::content_hash(&text);
    let kept = previous.and_then(|p| {
        p.chains
            .iter()
            .find(|c| c.def.file == file && c.def.content_hash == hash)
    });
    if let Some(engine) = kept {
        return Ok(Loaded::Kept(engine.def.clone()));
    }
    let (def, problems) = loader::parse_with_problems(&text, file, unknown)?;
    Ok(Loaded::Parsed(def, problems))
}

/// What spans chain files: unique ids, rule chain node targets and their
/// relations, and no cycle of chains calling each other. Chains from
/// `valid` on have problems of their own (already reported); `unreadable`
/// files are no chain at all.
fn check_references(chains: &[ChainDef], valid: usize, unreadable: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut ids: HashMap<&str, &Path> = HashMap::new();
    for def in chains {
        if let Some(other) = ids.insert(&def.id, &def.file) {
            problems.push(format!(
                "rule chain {}: its id {:?} is also the id of {}",
                def.file.display(),
                def.id,
                other.display()
            ));
        }
    }
    let aliases = aliases(chains);
    let mut calls: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<_> = (0..chains.len()).map(|i| calls.add_node(i)).collect();
    for (from, def) in chains.iter().enumerate() {
        for index in def.graph.node_indices() {
            let node = &def.graph[index];
            let NodeKind::RuleChain(config) = &node.kind else {
                continue;
            };
            let here = format!("rule chain {}: node {}", def.file.display(), node.label());
            let unreadable_stem = unreadable.iter().find(|f| {
                f.file_stem()
                    .is_some_and(|s| s.to_string_lossy() == config.target.as_str())
            });
            if let Some(file) = unreadable_stem {
                problems.push(format!(
                    "{here}: ruleChainId {:?} is {}, which has problems of its own (above)",
                    config.target,
                    file.display()
                ));
                continue;
            }
            let Some(&target) = aliases.get(config.target.as_str()) else {
                let known: Vec<String> = chains.iter().map(|c| format!("{:?}", c.stem)).collect();
                problems.push(format!(
                    "{here}: ruleChainId {:?} names no chain in the rule chain directory (chains: {})",
                    config.target,
                    known.join(", ")
                ));
                continue;
            };
            if target == from {
                problems.push(format!("{here}: the node calls its own chain"));
                continue;
            }
            calls.add_edge(nodes[from], nodes[target], ());
            if target >= valid {
                problems.push(format!(
                    "{here}: ruleChainId {:?} is {}, which has problems of its own (above)",
                    config.target,
                    chains[target].file.display()
                ));
                continue;
            }
            let outputs = chains[target].outputs();
            for edge in def.graph.edges(index) {
                let relation = edge.weight();
                let known = relation.eq_ignore_ascii_case(crate::msg::relation::FAILURE)
                    || outputs.iter().any(|o| o.eq_ignore_ascii_case(relation));
                if !known {
                    problems.push(format!(
                        "{here}: connection {relation:?}: chain {:?} has no output node of that name (outputs: {})",
                        chains[target].stem,
                        if outputs.is_empty() { "none".to_string() } else { outputs.join(", ") }
                    ));
                }
            }
        }
    }
    if petgraph::algo::is_cyclic_directed(&calls) {
        let cycle: Vec<String> = petgraph::algo::kosaraju_scc(&calls)
            .into_iter()
            .filter(|scc| scc.len() > 1)
            .flatten()
            .map(|i| chains[calls[i]].file.display().to_string())
            .collect();
        problems.push(format!(
            "rule chains call each other in a cycle: {}",
            cycle.join(" -> ")
        ));
    }
    problems
}

/// Compiles the scripts of the chains not taken from the previous set.
fn check_scripts(chains: &[ChainDef], fresh: &[usize], limits: JsLimits) -> Vec<String> {
    let mut scripts = Vec::new();
    for &i in fresh {
        let def = &chains[i];
        for index in def.graph.node_indices() {
            let node = &def.graph[index];
            for script in node.kind.scripts() {
                let place = format!("rule chain {}: node {}", def.file.display(), node.label());
                scripts.push((place, script));
            }
        }
    }
    if scripts.is_empty() {
        return Vec::new();
    }
    let compiled: Vec<&Script> = scripts.iter().map(|(_, s)| &*s.script).collect();
    match crate::convert::check_all(&compiled, limits) {
        Ok(errors) => errors
            .into_iter()
            .map(|(i, e)| {
                let (place, script) = &scripts[i];
                if script.tbel {
                    format!("{place}: the TBEL script is not JavaScript shardflow can run (TBEL runs only where it parses as JavaScript): {e}")
                } else {
                    format!("{place}: {e}")
                }
            })
            .collect(),
        Err(e) => vec![format!("cannot start a JavaScript runtime to check scripts: {e}")],
    }
}

/// Each integration's converters, reusing the previous set's compiled
/// scripts whose text did not change.
fn load_converters(
    config: &SetConfig,
    previous: Option<&RuleSet>,
    problems: &mut Vec<String>,
) -> (HashMap<String, Arc<Script>>, HashMap<String, Arc<Script>>) {
    let mut decoders = HashMap::new();
    let mut encoders = HashMap::new();
    let mut fresh: Vec<(String, Arc<Script>)> = Vec::new();
    for (name, uplink, downlink) in &config.converters {
        let files = [
            (ScriptKind::Decoder, Some(uplink)),
            (ScriptKind::Encoder, downlink.as_ref()),
        ];
        for (kind, path) in files {
            let Some(path) = path else { continue };
            let body = match std::fs::read_to_string(path) {
                Ok(body) if body.trim().is_empty() => {
                    // Valid JavaScript, but it would make every record a
                    // dead letter; most often a file caught mid-write.
                    problems.push(format!("converter {}: the file is empty", path.display()));
                    continue;
                }
                Ok(body) => body,
                Err(e) => {
                    problems.push(format!("converter {}: cannot read: {e}", path.display()));
                    continue;
                }
            };
            let (table, earlier) = match kind {
                ScriptKind::Decoder => (&mut decoders, previous.map(|p| &p.decoders)),
                _ => (&mut encoders, previous.map(|p| &p.encoders)),
            };
            let script = match earlier.and_then(|e| e.get(name)).filter(|s| s.body == body) {
                Some(same) => same.clone(),
                None => {
                    let script = Script::new(kind, path.display().to_string(), body);
                    fresh.push((format!("converter {}", path.display()), script.clone()));
                    script
                }
            };
            table.insert(name.clone(), script);
        }
    }
    let compiled: Vec<&Script> = fresh.iter().map(|(_, s)| &**s).collect();
    match crate::convert::check_all(&compiled, config.limits) {
        Ok(errors) => {
            for (i, e) in errors {
                problems.push(format!("{}: {e}", fresh[i].0));
            }
        }
        Err(e) => problems.push(format!("cannot start a JavaScript runtime: {e}")),
    }
    (decoders, encoders)
}

/// The files and directories a set is made of, for the watcher.
pub fn watched_dirs(config: &SetConfig) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec![config.chain_dir()];
    for (_, uplink, downlink) in &config.converters {
        for file in std::iter::once(uplink).chain(downlink.iter()) {
            if let Some(dir) = file.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir.to_path_buf()
                };
                dirs.push(dir);
            }
        }
    }
    let mut seen = HashSet::new();
    dirs.retain(|d| seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone())));
    dirs
}

/// How two sets differ, for the reload log line.
pub fn changes(old: &RuleSet, new: &RuleSet) -> Vec<String> {
    let mut changes = Vec::new();
    for chain in &new.chains {
        match old.chains.iter().find(|c| c.def.file == chain.def.file) {
            None => changes.push(format!("added {}", chain.def.file.display())),
            Some(c) if !Arc::ptr_eq(c, chain) => {
                changes.push(format!("changed {}", chain.def.file.display()))
            }
            Some(_) => {}
        }
    }
    for chain in &old.chains {
        if !new.chains.iter().any(|c| c.def.file == chain.def.file) {
            changes.push(format!("removed {}", chain.def.file.display()));
        }
    }
    for (table_old, table_new) in [
        (&old.decoders, &new.decoders),
        (&old.encoders, &new.encoders),
    ] {
        for (name, script) in table_new {
            if table_old.get(name).is_none_or(|s| !Arc::ptr_eq(s, script)) {
                changes.push(format!("changed {}", script.origin));
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn config(dir: &Path) -> SetConfig {
        SetConfig {
            root_chain: dir.join("root.json"),
            unknown_nodes: UnknownNodes::Reject,
            limits: JsLimits {
                call_timeout: std::time::Duration::from_millis(500),
                memory_limit_bytes: 32 << 20,
                max_result_bytes: 1 << 20,
            },
            converters: Vec::new(),
        }
    }

    const OUTPUT_CHAIN: &str = r#"{"ruleChain": {"name": "Helper"}, "metadata": {"firstNodeIndex": 0,
        "nodes": [{"type": "org.thingsboard.rule.engine.flow.TbRuleChainOutputNode", "name": "Done"}],
        "connections": []}}"#;

    fn caller(target: &str, relation: &str) -> String {
        format!(
            r#"{{"ruleChain": {{"name": "Root"}}, "metadata": {{"firstNodeIndex": 0, "nodes": [
            {{"type": "org.thingsboard.rule.engine.flow.TbRuleChainInputNode", "name": "call",
              "configuration": {{"ruleChainId": "{target}"}}}},
            {{"type": "org.thingsboard.rule.engine.action.TbLogNode", "name": "log", "configuration": {{}}}}],
            "connections": [{{"fromIndex": 0, "toIndex": 1, "type": "{relation}"}}]}}}}"#
        )
    }

    #[test]
    fn chains_refer_to_each_other_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "helper.json", OUTPUT_CHAIN);
        write(dir.path(), "root.json", &caller("helper", "Done"));
        let source = load(&config(dir.path()), None).unwrap();
        assert_eq!(source.chains.len(), 2);
        assert_eq!(source.chains[source.root].name, "Root");
    }

    #[test]
    fn links_that_lead_nowhere_and_devices_are_reported_not_read() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "root.json", &caller("helper", "Done"));
        write(dir.path(), "helper.json", OUTPUT_CHAIN);
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap();
        };
        link("/nonexistent/chain.json", "dangling.json");
        link(dir.path().join("loop.json").to_str().unwrap(), "loop.json");
        link("/dev/zero", "zero.json");
        let Err(problems) = load(&config(dir.path()), None) else {
            panic!("a set with odd chain entries loaded");
        };
        let all = problems.join("\n");
        assert_eq!(problems.len(), 3, "{all}");
        for name in ["dangling.json", "loop.json", "zero.json"] {
            assert!(all.contains(name), "{name}: {all}");
        }
        assert!(all.contains("not a regular file"), "{all}");
    }

    #[test]
    fn references_are_checked_across_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "helper.json", OUTPUT_CHAIN);
        write(dir.path(), "root.json", &caller("nowhere", "Done"));
        let problems = load(&config(dir.path()), None).err().unwrap();
        assert!(problems[0].contains("names no chain"), "{problems:?}");

        write(dir.path(), "root.json", &caller("helper", "Nope"));
        let problems = load(&config(dir.path()), None).err().unwrap();
        assert!(problems[0].contains("no output node"), "{problems:?}");
    }

    #[test]
    fn chains_calling_each_other_in_a_cycle_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let a = caller("b", "Failure").replace("Root", "A");
        let b = caller("root", "Failure").replace("Root", "B");
        write(dir.path(), "root.json", &a);
        write(dir.path(), "b.json", &b);
        let problems = load(&config(dir.path()), None).err().unwrap();
        assert!(problems.iter().any(|p| p.contains("cycle")), "{problems:?}");
    }

    #[test]
    fn every_broken_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "root.json", "{ not json");
        write(dir.path(), "other.json", r#"{"metadata": {"nodes": []}}"#);
        let problems = load(&config(dir.path()), None).err().unwrap();
        assert!(
            problems.iter().any(|p| p.contains("root.json")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("other.json")),
            "{problems:?}"
        );
    }
}
