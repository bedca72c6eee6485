//! The `stoker` binary: parses the command line and hands over to the library.
mod cli;

use std::{io::Write, process::ExitCode, time::Duration};

use clap::Parser;
use cli::{AdviseArgs, AgentArgs, Cli, Command, DumpArgs, RecordArgs, TopArgs};
use stoker::{advise, doctor, error::one_line, node::config::AgentConfig, record};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    // Colors only on a terminal: a log file or a container log keeps plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    // A bug must still read as one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("stoker: internal error: {info}");
    }));

    match cli.command {
        Command::Record(args) => record_cmd(args),
        Command::Advise(args) => advise_cmd(args),
        Command::Dump(args) => dump_cmd(&args),
        Command::Top(args) => top_cmd(args),
        Command::Doctor => doctor_cmd(),
        Command::Agent(args) => agent_cmd(args),
    }
}

/// A command line clap refused: `--help` and `--version` print as clap writes them; an
/// error is one `stoker: error:` line naming the help to read (clap's own tips, such as
/// `-- -5` for a negative number, would launch a command).
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // `stoker` alone: the list of commands.
        let _ = e.print();
        return ExitCode::from(2);
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim_start_matches("error: ").trim_end_matches('.');
    // The subcommand the error is about (the first word given that names one), for the
    // help to read; a mistyped subcommand gets clap's suggestion.
    let names: Vec<String> = <Cli as clap::CommandFactory>::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    let command = std::env::args()
        .skip(1)
        .find(|w| names.contains(w))
        .map_or("stoker --help".to_string(), |c| format!("stoker {c} --help"));
    let first = match (e.get(ContextKind::SuggestedSubcommand), e.get(ContextKind::InvalidArg)) {
        (Some(suggested), _) => format!("{first}; did you mean {suggested}?"),
        // The arguments a line such as "the following required arguments were not provided:"
        // announces, listed on the lines after it.
        (None, Some(ContextValue::Strings(args))) if first.ends_with(':') => {
            format!("{first} {}", args.join(", "))
        }
        _ => first.to_string(),
    };
    eprintln!("stoker: error: {first} (see `{command}`)");
    ExitCode::from(2)
}

fn top_cmd(args: TopArgs) -> ExitCode {
    if args.pids.is_empty() && !args.all_python {
        eprintln!("stoker: error: nothing to watch: give --pid PID or --all-python");
        return ExitCode::from(2);
    }
    let opts = stoker::top::TopOptions {
        pids: args.pids,
        all_python: args.all_python,
        rate_hz: args.rate,
        duration: args.duration.map(Duration::from_secs_f64),
    };
    match stoker::top::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoker: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn dump_cmd(args: &DumpArgs) -> ExitCode {
    match stoker::dump::dump(args.pid) {
        Ok(dump) if args.json => match serde_json::to_string_pretty(&dump) {
            Ok(text) => {
                // A closed pipe (`| head`) is the reader's choice, not an error.
                let _ = writeln!(std::io::stdout(), "{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("stoker: error: {}", one_line(&e));
                ExitCode::FAILURE
            }
        },
        Ok(dump) => {
            let _ = write!(std::io::stdout(), "{}", dump.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stoker: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn agent_cmd(args: AgentArgs) -> ExitCode {
    if args.list_metrics {
        for name in stoker::node::prometheus_series() {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
    let env = |k: &str| std::env::var(k).ok();
    let config = match AgentConfig::load(args.config.as_deref(), &args.set, env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stoker: error: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("stoker: configuration is valid");
        return ExitCode::SUCCESS;
    }
    match stoker::node::run(&config, &env) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoker: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn record_cmd(args: RecordArgs) -> ExitCode {
    if args.pids.is_empty() && args.command.is_empty() && !args.all_python {
        eprintln!("stoker: error: nothing to record: give --pid PID, --all-python or a command after `--`");
        return ExitCode::from(2);
    }
    let opts = record::RecordOptions {
        pids: args.pids,
        command: args.command,
        duration: args.duration.map(Duration::from_secs_f64),
        rate_hz: args.rate,
        format: args.format,
        output: args.output,
        all_python: args.all_python,
        subprocesses: args.subprocesses,
        native: args.native,
        threads: args.threads,
        nolineno: args.nolineno,
        full_filenames: args.full_filenames,
        kernel_stats: args.kernel_stats,
        net: args.net,
        net_detail: args.net_detail,
        mode: args.mode,
        gil: args.gil,
        loop_block_threshold: Some(args.loop_block_threshold).filter(|d| !d.is_zero()),
        switch_budget: args.switch_budget,
        waits: args.waits,
    };
    match record::run(&opts) {
        Ok(summary) => {
            eprint!("{}", summary.render());
            // A launched command's failure is the session's, as when it runs alone.
            match summary.command_status {
                Some(code) if code != 0 => ExitCode::from(code.clamp(1, 255) as u8),
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("stoker: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn advise_cmd(args: AdviseArgs) -> ExitCode {
    if args.pids.is_empty() && args.command.is_empty() && !args.all_python {
        eprintln!("stoker: error: nothing to watch: give --pid PID, --all-python or a command after `--`");
        return ExitCode::from(2);
    }
    // An unwritable output fails now, not after the session.
    if let Some(path) = &args.output
        && let Err(e) = std::fs::File::create(path)
    {
        eprintln!("stoker: error: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let opts = advise::AdviseOptions {
        pids: args.pids,
        command: args.command,
        all_python: args.all_python,
        duration: args.duration.map(Duration::from_secs_f64),
        format: args.format,
        output: args.output.clone(),
    };
    let advice = match advise::run(&opts) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stoker: error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let text = advice.render(args.format);
    match &args.output {
        None => print!("{text}"),
        Some(path) => match std::fs::write(path, text) {
            Ok(()) => eprintln!("stoker: advice written to {}", path.display()),
            Err(e) => {
                eprintln!("stoker: error: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    }
    ExitCode::SUCCESS
}

fn doctor_cmd() -> ExitCode {
    let checks = doctor::run();
    for check in &checks {
        println!("{}", check.render());
    }
    if doctor::can_sample(&checks) {
        println!("stoker can sample on this machine");
        ExitCode::SUCCESS
    } else {
        println!("stoker cannot sample here: see the FAIL lines above");
        ExitCode::FAILURE
    }
}
