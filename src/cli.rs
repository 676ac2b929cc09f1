//! The command line: `shardflow run` and `shardflow check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "shardflow",
    version,
    about = "AWS Kinesis -> JS converters -> rule chains -> storage, in one binary"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum DlqAction {
    /// List dead letters, oldest first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Leave out those already replayed.
        #[arg(long)]
        unreplayed: bool,
    },
    /// Show one dead letter with its payload.
    Show { id: i64 },
    /// Replay dead letters through the running service's current converter
    /// and chain (all not yet replayed, or those chosen).
    Replay {
        #[arg(long = "id")]
        ids: Vec<i64>,
        /// Only those stored since this time: epoch ms or RFC 3339 UTC.
        #[arg(long)]
        since: Option<String>,
    },
    /// Delete dead letters: the ids given, those older than some days, or
    /// all.
    Purge {
        #[arg(long = "id")]
        ids: Vec<i64>,
        #[arg(long)]
        older_than_days: Option<u64>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service until SIGINT or SIGTERM.
    Run {
        #[arg(long, short, default_value = "shardflow.toml")]
        config: PathBuf,
    },
    /// Validate the config, the rule chains and the converters; list every
    /// problem found.
    Check {
        #[arg(long, short, default_value = "shardflow.toml")]
        config: PathBuf,
    },
    /// Dead letters: records and messages that could not be processed.
    Dlq {
        #[arg(long, short, default_value = "shardflow.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Print the argon2 hash of a password read from standard input (its
    /// first line), for `[http] password_hash`.
    HashPassword,
    /// Debug events of rule nodes in debug mode, newest first.
    Events {
        #[arg(long, short, default_value = "shardflow.toml")]
        config: PathBuf,
        /// Only those of this chain (its name).
        #[arg(long)]
        chain: Option<String>,
        /// Only those of nodes whose label contains this text.
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Measure throughput, latency and memory on this machine (see
    /// scripts/bench, which also starts a Kinesis emulator).
    Bench {
        /// Records for the pipeline and emulator runs.
        #[arg(long, default_value_t = 200_000)]
        records: usize,
        /// Backlog of the 16-shard memory run.
        #[arg(long, default_value_t = 1_000_000)]
        backlog: usize,
        /// A Kinesis emulator endpoint, for the runs through Kinesis.
        #[arg(long)]
        endpoint: Option<String>,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-results/latest.json")]
        out: PathBuf,
        /// The Node.js binary to compare the converter with.
        #[arg(long, default_value = "node")]
        node: String,
        /// Records of the light-load latency run.
        #[arg(long, default_value_t = 1000)]
        latency_records: usize,
        /// Records per second of the light-load latency run.
        #[arg(long, default_value_t = 50.0)]
        latency_rate: f64,
        /// Only these parts, e.g. `--parts 1,3` (default: all).
        #[arg(long, value_delimiter = ',')]
        parts: Vec<u8>,
    },
}

/// Parses arguments, runs the command, and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
        Command::Dlq { config, action } => match crate::dead_letters::run(&config, action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::HashPassword => hash_password(),
        Command::Events {
            config,
            chain,
            node,
            limit,
        } => match crate::dead_letters::events(&config, chain, node, limit) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench {
            records,
            backlog,
            endpoint,
            out,
            node,
            latency_records,
            latency_rate,
            parts,
        } => bench(crate::bench::BenchOptions {
            records,
            backlog,
            endpoint,
            out,
            node,
            latency_records,
            latency_rate,
            parts,
        }),
    }
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("error: cannot read the password from standard input: {e}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("error: the password is empty (give it on standard input)");
        return ExitCode::FAILURE;
    }
    match crate::api::auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(options: crate::bench::BenchOptions) -> ExitCode {
    let io = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(io) => io,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = io.handle().clone();
    let result = actix::System::new().block_on(crate::bench::run(options, handle));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a log file or a journal
    // gets plain text (and NO_COLOR turns them off everywhere).
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if crate::config::readable_by_others(&path) {
        tracing::warn!(
            file = %path.display(),
            "the config file is readable by other users and may hold secrets; chmod 600 it or use ${{VAR}} values"
        );
    }
    match crate::service::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The root chain a config file names (or the default), when the file is
/// valid TOML.
fn root_chain_of(path: &std::path::Path) -> Option<PathBuf> {
    let table: toml::Table = std::fs::read_to_string(path).ok()?.parse().ok()?;
    let chain = table
        .get("root_chain")
        .and_then(|v| v.as_str())
        .unwrap_or("rulechains/root.json");
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    Some(base.join(chain))
}

fn check(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            println!("{e}");
            // The chains do not depend on the rest of the config: check
            // them too, so one run shows everything.
            if let Some(root_chain) = root_chain_of(&path) {
                let set = crate::chain::set::SetConfig {
                    root_chain,
                    unknown_nodes: Default::default(),
                    limits: crate::service::js_limits_default(),
                    converters: Vec::new(),
                };
                if let Err(problems) = crate::chain::set::load(&set, None) {
                    println!("{} problem(s) in the rule chains:", problems.len());
                    for problem in problems {
                        println!("  - {problem}");
                    }
                }
            }
            return ExitCode::from(1);
        }
    };
    let problems = match crate::service::preflight(&config) {
        Ok(source) => {
            println!(
                "ok: {} integration(s), {} rule chain(s) (root {}), converters compile",
                config.integrations.len(),
                source.chains.len(),
                config.root_chain.display()
            );
            return ExitCode::SUCCESS;
        }
        Err(problems) => problems,
    };
    {
        println!("{} problem(s) found:", problems.len());
        for problem in problems {
            println!("  - {problem}");
        }
        ExitCode::from(1)
    }
}
