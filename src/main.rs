//! The command line: parse, load configuration, dispatch. Exit codes (SPEC §6): 0 ok,
//! 1 runtime failure, 2 bad configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use opencti_threatbus::config::{self, Config};
use opencti_threatbus::inspect::{Query, Section};
use opencti_threatbus::maintenance;
use opencti_threatbus::store::Queue;
use opencti_threatbus::{daemon, logging};

#[derive(Parser)]
#[command(
    name = "opencti-threatbus",
    version,
    about = "Restart-safe bridge between OpenCTI and Threat Bus"
)]
struct Cli {
    /// Configuration file (YAML). Default: $CONFIG_FILE, else ./config.yml if present.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default command).
    Run,
    /// Show queue counts, ages, the stream position and the first items. Read-only.
    InspectQueue {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// List items of this queue only.
        #[arg(long, value_parser = ["indicators", "sightings", "imports", "dead"])]
        queue: Option<String>,
        /// Items listed per queue.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Put dead letters back at the end of their queue.
    RequeueDead(DeadArgs),
    /// Delete dead letters for good.
    PurgeDead {
        #[command(flatten)]
        dead: DeadArgs,
        /// Required to purge without --id: deletes every dead letter that matches --queue.
        #[arg(long)]
        all: bool,
    },
    /// Exit 0 if the running daemon answers on its admin socket and is healthy (for container
    /// health checks); exit 1 if it answers unhealthy (disk full, exiting after a store failure).
    Health {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Ask the running daemon to check every active indicator against OpenCTI, queue a
    /// REMOVE for each one OpenCTI deleted, revoked, merged or no longer detects, and print
    /// what it found.
    Reconcile {
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct StoreArgs {
    /// Data directory; default: bridge.data_dir from the configuration (BRIDGE_DATA_DIR).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct DeadArgs {
    /// Only dead letters that came from this queue.
    #[arg(long, value_parser = ["indicators", "sightings", "imports"])]
    queue: Option<String>,
    /// Only the dead letter with this key (repeatable); see inspect-queue --queue dead.
    #[arg(long = "id", value_name = "KEY")]
    ids: Vec<u64>,
    #[command(flatten)]
    store: StoreArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::InspectQueue {
            json,
            queue,
            limit,
            store,
        } => {
            let query = Query {
                section: queue.as_deref().and_then(Section::parse),
                limit,
            };
            with_data_dir(&cli.config, store, |dir| {
                maintenance::inspect(&dir, &query, json)
            })
        }
        Command::RequeueDead(args) => {
            let queue = args.queue.as_deref().and_then(Queue::parse);
            with_data_dir(&cli.config, args.store, |dir| {
                maintenance::requeue_dead(&dir, queue, args.ids)
            })
        }
        Command::PurgeDead { dead, all } => {
            if dead.ids.is_empty() && !all {
                eprintln!("error: purge-dead deletes data for good: name dead letters with --id KEY, or pass --all");
                return ExitCode::from(2);
            }
            let queue = dead.queue.as_deref().and_then(Queue::parse);
            with_data_dir(&cli.config, dead.store, |dir| {
                maintenance::purge_dead(&dir, queue, dead.ids)
            })
        }
        Command::Health { store } => {
            with_data_dir(&cli.config, store, |dir| maintenance::health(&dir))
        }
        Command::Reconcile { json, store } => {
            with_data_dir(&cli.config, store, |dir| maintenance::reconcile(&dir, json))
        }
    }
}

fn run(config_path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(config_path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.connector.log_level, config.connector.log_format);
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn with_data_dir(
    config_path: &Option<PathBuf>,
    args: StoreArgs,
    command: impl FnOnce(PathBuf) -> anyhow::Result<String>,
) -> ExitCode {
    logging::init_for_tools();
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => match config::load_data_dir(config_path.as_deref()) {
            Ok(dir) => dir,
            Err(e) => {
                eprintln!("configuration error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match command(data_dir) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
