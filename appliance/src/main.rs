//! `labrack`: the LabRack appliance binary.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = labrack::cli::Cli::parse();
    match labrack::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("labrack: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
