//! The real `labrack-host` binary: telemetry on this machine (no NVIDIA here, so the
//! clean no-GPU path) and clear errors for bad usage.

use std::process::Command;

fn labrack_host() -> Command {
    let dir = labrack_e2e::labrack_bin()
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    Command::new(dir.join("labrack-host"))
}

#[test]
fn telemetry_prints_one_json_sample_and_reports_gpus_or_why_not() {
    let output = labrack_host()
        .args(["telemetry", "--interval-ms", "100"])
        .output()
        .expect("run labrack-host");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stderr.is_empty(),
        "no error spam without a GPU: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let sample: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(sample["version"], 2);
    assert!(
        sample["resources"]["enforces"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x == "memory")),
        "what the host can enforce: {sample}"
    );
    assert!(sample["memory_total_bytes"].as_u64().is_some_and(|m| m > 0));
    match sample["gpus"]["status"].as_str() {
        Some("no_gpu") => assert!(
            sample["gpus"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("NVML"))
        ),
        Some("present") => assert!(sample["gpus"]["devices"].is_array()),
        other => panic!("unexpected gpu status {other:?}"),
    }
}

#[test]
fn bad_usage_is_a_clear_error() {
    let output = labrack_host()
        .arg("telemetry")
        .args(["--interval-ms", "soon"])
        .output()
        .expect("run labrack-host");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--interval-ms"));
}
