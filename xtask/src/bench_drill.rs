//! `cargo xtask bench drill --minutes N`: the power-cut drill (`labrack_e2e::drill`, also a
//! test of two minutes) run longer on release builds: a scripted event while `kill -9` hits
//! the appliance, the lab host and the cloud at random; then nothing lost, nothing twice.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_e2e::drill::{DrillOptions, run as run_drill};

use crate::util::{self, cargo, run};

pub(crate) fn bench_drill(args: &[String]) -> anyhow::Result<()> {
    let (mut minutes, mut kill_every, mut teams) = (10_u64, 12_u64, 4_usize);
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let value: u64 = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--minutes" => minutes = value,
            "--kill-every-secs" => kill_every = value,
            "--teams" => teams = usize::try_from(value)?,
            _ => bail!("unknown option {flag}; options: --minutes --kill-every-secs --teams"),
        }
    }
    anyhow::ensure!(
        minutes > 0 && kill_every > 0 && teams > 0,
        "values must be positive"
    );
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "labrack",
        "-p",
        "labrack-host",
        "-p",
        "labrack-cloud",
    ]))?;
    let release = util::target_dir().join("release");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let report = runtime.block_on(run_drill(&DrillOptions {
        labrack: release.join("labrack"),
        labrack_host: release.join("labrack-host"),
        duration: Duration::from_secs(minutes * 60),
        kill_every: Duration::from_secs(kill_every),
        teams,
    }))?;
    println!(
        "\nbench drill: {minutes} min, {teams} teams, a kill -9 every ~{kill_every} s, {:.0} s in all\n{report}",
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(report.problems.is_empty(), "the drill found problems");
    Ok(())
}
