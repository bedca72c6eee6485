//! The `stoker` binary: parses the command line and hands over to the library.
mod cli;

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use cli::{AgentArgs, Cli, Command, RecordArgs};
use stoker::{doctor, error::one_line, node::config::AgentConfig, record};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Doctor => doctor_cmd(),
        Command::Agent(args) => agent_cmd(args),
    }
}

fn agent_cmd(args: AgentArgs) -> ExitCode {
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
        full_filenames: args.full_filenames,
        kernel_stats: args.kernel_stats,
        net: args.net,
        mode: args.mode,
        gil: args.gil,
        loop_block_threshold: Some(args.loop_block_threshold).filter(|d| !d.is_zero()),
        switch_budget: args.switch_budget,
    };
    match record::run(&opts) {
        Ok(summary) => {
            eprint!("{}", summary.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stoker: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
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
