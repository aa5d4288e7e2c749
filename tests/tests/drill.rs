//! The power-cut drill (see `labrack_e2e::drill`): two minutes of a scripted event while
//! `kill -9` hits the appliance, the lab host and the cloud at random, then nothing lost and
//! nothing twice. `cargo xtask bench drill --minutes N` runs it longer on release builds.

use std::time::Duration;

use labrack_e2e::drill::{DrillOptions, run};
use labrack_e2e::{labrack_bin, labrack_host_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_at_random_loses_nothing_and_doubles_nothing() -> anyhow::Result<()> {
    let report = run(&DrillOptions {
        labrack: labrack_bin(),
        labrack_host: labrack_host_bin(),
        duration: Duration::from_secs(120),
        kill_every: Duration::from_secs(12),
        teams: 3,
    })
    .await?;
    eprintln!("{report}");
    assert!(report.problems.is_empty(), "{report}");
    let kills: usize = report.kills.values().sum();
    assert!(
        kills >= 5,
        "the drill killed too little to prove anything: {report}"
    );
    for kind in ["submission", "ledger credit", "judge score"] {
        assert!(
            report.acknowledged.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} was acknowledged: {report}"
        );
    }
    assert!(
        report.check_batches > 0 && report.outbox_rows > 0,
        "{report}"
    );
    Ok(())
}
