//! `labrack-host`: the agent on each lab machine. Today it reports telemetry; enrolment
//! and the pulled task loop (issue 3) come next.

mod telemetry;

use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: labrack-host telemetry [--interval-ms N]

  telemetry   print one telemetry sample (CPU, memory, disks, NVIDIA GPUs) as JSON
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("labrack-host: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("telemetry") => {
            let interval = match (args.get(1).map(String::as_str), args.get(2)) {
                (None, _) => Duration::from_millis(500),
                (Some("--interval-ms"), Some(ms)) => {
                    Duration::from_millis(ms.parse().map_err(|_| anyhow::anyhow!("--interval-ms needs a number, got {ms:?}"))?)
                }
                (Some(other), _) => anyhow::bail!("unknown option {other:?}\n\n{USAGE}"),
            };
            println!("{}", serde_json::to_string_pretty(&telemetry::sample(interval))?);
            Ok(())
        }
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}
