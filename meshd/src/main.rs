//! The `meshd` binary: parses the command line and dispatches.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Crash tests only: a build with the `failpoints` feature arms the failpoints `FAILPOINTS`
    // names. A build without them ignores the variable (and says so).
    if let Err(e) = pki::failpoints::configure_from_env() {
        if pki::failpoints::ENABLED {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        eprintln!("warning: {e}; ignored");
    }
    let cli = meshd::cli::Cli::parse();
    match meshd::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
