//! The allocation state machine, as a pure function of (allocation, input, now):
//!
//! ```text
//! requested → provisioning → active → releasing → released
//!                  │             │ ↺ reset   │
//!                  └→ failed  ←──┘           └→ release_failed
//! ```
//!
//! A reset keeps the allocation `active` while its task is in flight; a reset that keeps
//! failing gives up into `failed`.
//!
//! A host that misses its heartbeats makes its labs `unreachable` (from provisioning,
//! active or releasing): nothing is lost, the task in flight stays out, and when the host
//! is heard again each lab goes back to where it was. Only when the host stays silent past
//! the appliance's grace does the lab fail; then staff decide (resume it once the host is
//! back, reassign, release). Nothing here ever deletes a lab on its own.
//!
//! Tasks that fail are retried with exponential backoff; after `max_attempts` the
//! allocation gives up into `failed` / `release_failed` with the last error as reason.
//! Results for tasks that are not the one in flight (late duplicates, earlier attempts)
//! are ignored, so re-delivery is harmless.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::LabLimits;
use crate::protocol::{
    DesktopAccess, HostTask, PROTOCOL_VERSION, Password, TaskId, TaskKind, TaskOutcome,
};

/// Where an allocation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocationState {
    Requested,
    Provisioning,
    Active,
    Releasing,
    Released,
    Failed,
    ReleaseFailed,
    /// the host went silent; the lab waits (its grace) to go back to [`Allocation::resume_to`]
    Unreachable,
}

impl AllocationState {
    /// No task will ever be issued again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Released)
    }
}

/// Retry policy for host tasks.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Wait before attempt `attempt + 1` after `attempt` failed: base × 2^(attempt-1), capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1_u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// One allocation and the reconciler's bookkeeping for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub id: i64,
    pub host_id: i64,
    pub template: String,
    /// the template's desktop runtime and home skeleton, copied at allocation time so a
    /// later template edit does not change a running lab
    pub runtime: String,
    pub skeleton: String,
    /// the template's limits, copied at allocation time too
    pub limits: LabLimits,
    /// the GPU indices the lab holds on its host (chosen at placement)
    pub gpu_indices: Vec<u32>,
    pub state: AllocationState,
    /// attempt number of the task in flight or last tried (1-based; 0 before any)
    pub attempt: u32,
    /// tasks ever issued for this allocation; numbers task ids, so every request (a second
    /// reset, a retry) gets an id no host has seen
    pub tasks_issued: u32,
    /// the task whose result we wait for
    pub in_flight: Option<TaskId>,
    /// when the next attempt may be issued (ms since the epoch), after a failure
    pub retry_at_ms: Option<u64>,
    /// why the allocation failed, for staff
    pub reason: Option<String>,
    /// the state an unreachable lab goes back to when its host is heard again (kept once it
    /// failed for silence, so staff can resume it)
    pub resume_to: Option<AllocationState>,
    /// when the host went silent
    pub unreachable_since_ms: Option<u64>,
}

impl Allocation {
    pub fn new(
        id: i64,
        host_id: i64,
        template: &crate::template::Template,
        gpu_indices: Vec<u32>,
    ) -> Self {
        Self {
            id,
            host_id,
            template: template.name.clone(),
            runtime: template.runtime.clone(),
            skeleton: template.skeleton.clone(),
            limits: template.limits.clone(),
            gpu_indices,
            state: AllocationState::Requested,
            attempt: 0,
            tasks_issued: 0,
            in_flight: None,
            retry_at_ms: None,
            reason: None,
            resume_to: None,
            unreachable_since_ms: None,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// time passed: issue what is due (the first provision, a retry)
    Tick,
    /// a host reported a task
    Report { id: TaskId, outcome: TaskOutcome },
    /// staff or the event asked to free the lab
    ReleaseRequested,
    /// staff or the team asked to restore the desktop to the template
    ResetRequested,
    /// staff gave up on the host: mark released without its help
    ForceRelease,
    /// the host missed its heartbeats
    HostUnhealthy,
    /// the host is heard again
    HostBack,
    /// the host stayed silent past the appliance's grace
    GraceOver,
    /// staff take back a lab that failed because its host was silent, the host being back
    Resume,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// deliver this task to the host (idempotent: the id is stable)
    Issue(HostTask),
    /// the state changed; persist and audit it
    Changed {
        from: AllocationState,
        to: AllocationState,
    },
    /// the host reported (new) desktop credentials; store them encrypted
    Desktop(DesktopAccess),
    /// a reset finished; the allocation stays active
    ResetDone,
    /// the input did not apply (stale report, release of a released lab, …)
    Ignored { why: &'static str },
}

/// Advances `alloc` by one input at time `now_ms`.
pub fn step(
    alloc: &mut Allocation,
    input: Input,
    now_ms: u64,
    policy: &RetryPolicy,
) -> Vec<Output> {
    use AllocationState as S;
    let mut out = Vec::new();
    match (alloc.state, input) {
        (S::Requested, Input::Tick) => {
            transition(alloc, S::Provisioning, &mut out);
            issue(alloc, 1, &mut out);
        }
        (S::Provisioning | S::Releasing | S::Active, Input::Tick) => {
            if alloc.in_flight.is_none() && alloc.retry_at_ms.is_some_and(|at| now_ms >= at) {
                let next = alloc.attempt + 1;
                issue(alloc, next, &mut out);
            }
        }
        (S::Provisioning | S::Releasing | S::Active, Input::Report { id, outcome }) => {
            if alloc.in_flight.as_ref() != Some(&id) {
                out.push(Output::Ignored {
                    why: "report for a task that is not in flight",
                });
                return out;
            }
            alloc.in_flight = None;
            match outcome {
                TaskOutcome::Succeeded { desktop } => {
                    alloc.retry_at_ms = None;
                    alloc.reason = None;
                    if let Some(desktop) = desktop {
                        out.push(Output::Desktop(desktop));
                    }
                    match alloc.state {
                        S::Provisioning => transition(alloc, S::Active, &mut out),
                        S::Releasing => transition(alloc, S::Released, &mut out),
                        _ => out.push(Output::ResetDone),
                    }
                }
                failed @ (TaskOutcome::Failed { .. } | TaskOutcome::Checked { .. }) => {
                    let error = match failed {
                        TaskOutcome::Failed { error } => error,
                        _ => "the host answered a lab task with a check result".to_owned(),
                    };
                    if alloc.attempt >= policy.max_attempts {
                        alloc.retry_at_ms = None;
                        alloc.reason =
                            Some(format!("gave up after {} attempts: {error}", alloc.attempt));
                        let to = if alloc.state == S::Releasing {
                            S::ReleaseFailed
                        } else {
                            S::Failed
                        };
                        transition(alloc, to, &mut out);
                    } else {
                        let wait = u64::try_from(policy.backoff(alloc.attempt).as_millis())
                            .unwrap_or(u64::MAX);
                        alloc.retry_at_ms = Some(now_ms.saturating_add(wait));
                        alloc.reason = Some(error);
                    }
                }
            }
        }
        (S::Active, Input::ResetRequested) => {
            if alloc.in_flight.is_some() || alloc.retry_at_ms.is_some() {
                out.push(Output::Ignored {
                    why: "a reset is already under way",
                });
            } else {
                issue(alloc, 1, &mut out);
            }
        }
        (S::Active | S::Failed | S::ReleaseFailed, Input::ReleaseRequested) => {
            transition(alloc, S::Releasing, &mut out);
            issue(alloc, 1, &mut out);
        }
        (S::Requested, Input::ReleaseRequested) | (_, Input::ForceRelease)
            if alloc.state != S::Released =>
        {
            alloc.in_flight = None;
            alloc.retry_at_ms = None;
            transition(alloc, S::Released, &mut out);
        }
        (S::Provisioning | S::Active | S::Releasing, Input::HostUnhealthy) => {
            // The task in flight stays out: the host answers it when it is back.
            alloc.resume_to = Some(alloc.state);
            alloc.unreachable_since_ms = Some(now_ms);
            alloc.reason = Some(
                "the host stopped sending heartbeats; the lab waits for it to come back".into(),
            );
            transition(alloc, S::Unreachable, &mut out);
        }
        (S::Unreachable, Input::HostBack) => {
            let back = alloc.resume_to.take().unwrap_or(S::Active);
            alloc.unreachable_since_ms = None;
            alloc.reason = None;
            restore(alloc, back, &mut out);
        }
        (S::Unreachable, Input::Report { id, outcome }) => {
            // A report is the host heard again.
            let back = alloc.resume_to.take().unwrap_or(S::Active);
            alloc.unreachable_since_ms = None;
            alloc.reason = None;
            restore(alloc, back, &mut out);
            out.extend(step(alloc, Input::Report { id, outcome }, now_ms, policy));
        }
        (S::Unreachable, Input::GraceOver) => {
            let silent_for = alloc
                .unreachable_since_ms
                .map_or(0, |since| now_ms.saturating_sub(since) / 1000);
            alloc.in_flight = None;
            alloc.retry_at_ms = None;
            alloc.reason = Some(format!(
                "the host has been silent for {silent_for} s, longer than the grace; nothing was removed: resume the lab once the host is back, reassign or release it"
            ));
            let to = if alloc.resume_to == Some(S::Releasing) {
                S::ReleaseFailed
            } else {
                S::Failed
            };
            transition(alloc, to, &mut out);
        }
        (S::Failed, Input::Resume) if alloc.resume_to == Some(S::Active) => {
            alloc.resume_to = None;
            alloc.unreachable_since_ms = None;
            alloc.reason = None;
            transition(alloc, S::Active, &mut out);
        }
        (S::Unreachable, Input::ReleaseRequested) => {
            alloc.resume_to = None;
            alloc.unreachable_since_ms = None;
            transition(alloc, S::Releasing, &mut out);
            issue(alloc, 1, &mut out);
        }
        (_, Input::Tick) => {}
        (_, Input::Report { .. }) => out.push(Output::Ignored {
            why: "no task is in flight in this state",
        }),
        (_, Input::ReleaseRequested) => out.push(Output::Ignored {
            why: "already releasing or released",
        }),
        (_, Input::ResetRequested) => out.push(Output::Ignored {
            why: "only an active lab can be reset",
        }),
        (_, Input::ForceRelease) => out.push(Output::Ignored {
            why: "already released",
        }),
        (_, Input::HostUnhealthy | Input::HostBack | Input::GraceOver) => {}
        (_, Input::Resume) => out.push(Output::Ignored {
            why: "only a lab that failed because its host went silent can be resumed",
        }),
    }
    out
}

/// Back from unreachable to `to`, without the bookkeeping of a fresh provisioning or
/// release (its attempt count and task in flight are kept).
fn restore(alloc: &mut Allocation, to: AllocationState, out: &mut Vec<Output>) {
    let from = alloc.state;
    alloc.state = to;
    out.push(Output::Changed { from, to });
}

fn transition(alloc: &mut Allocation, to: AllocationState, out: &mut Vec<Output>) {
    let from = alloc.state;
    alloc.state = to;
    if matches!(to, AllocationState::Releasing | AllocationState::Released) {
        alloc.resume_to = None;
        alloc.unreachable_since_ms = None;
    }
    if matches!(
        to,
        AllocationState::Provisioning | AllocationState::Releasing
    ) {
        alloc.attempt = 0;
    }
    out.push(Output::Changed { from, to });
}

/// Issues the task the state calls for. A provision or reset carries an empty password:
/// the caller fills in a fresh one before the task is stored (`TaskKind::password_mut`).
fn issue(alloc: &mut Allocation, attempt: u32, out: &mut Vec<Output>) {
    let kind = match alloc.state {
        AllocationState::Releasing => TaskKind::Release {
            allocation_id: alloc.id,
        },
        AllocationState::Active => TaskKind::Reset {
            allocation_id: alloc.id,
            skeleton: alloc.skeleton.clone(),
            password: Password::default(),
            limits: alloc.limits.clone(),
            gpus: alloc.gpu_indices.clone(),
        },
        _ => TaskKind::Provision {
            allocation_id: alloc.id,
            template: alloc.template.clone(),
            runtime: alloc.runtime.clone(),
            skeleton: alloc.skeleton.clone(),
            password: Password::default(),
            limits: alloc.limits.clone(),
            gpus: alloc.gpu_indices.clone(),
        },
    };
    alloc.tasks_issued = alloc.tasks_issued.saturating_add(1);
    let id = TaskId::new(alloc.id, kind.name(), alloc.tasks_issued);
    alloc.attempt = attempt;
    alloc.in_flight = Some(id.clone());
    alloc.retry_at_ms = None;
    out.push(Output::Issue(HostTask {
        version: PROTOCOL_VERSION,
        id,
        host_id: alloc.host_id,
        kind,
    }));
}

#[cfg(test)]
mod tests {
    use super::AllocationState as S;
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
        }
    }

    fn issued(out: &[Output]) -> Option<&HostTask> {
        out.iter().find_map(|o| {
            if let Output::Issue(task) = o {
                Some(task)
            } else {
                None
            }
        })
    }

    fn fail(alloc: &mut Allocation, now: u64) -> Vec<Output> {
        let id = alloc.in_flight.clone().expect("a task in flight");
        step(
            alloc,
            Input::Report {
                id,
                outcome: TaskOutcome::Failed {
                    error: "boom".into(),
                },
            },
            now,
            &policy(),
        )
    }

    fn succeed(alloc: &mut Allocation, now: u64) -> Vec<Output> {
        let id = alloc.in_flight.clone().expect("a task in flight");
        step(
            alloc,
            Input::Report {
                id,
                outcome: TaskOutcome::done(),
            },
            now,
            &policy(),
        )
    }

    fn template(name: &str) -> crate::template::Template {
        crate::template::Template {
            name: name.into(),
            runtime: "local-user".into(),
            gpus: 0,
            gpu_memory_mib: None,
            skeleton: "/srv/skel".into(),
            checks: Vec::new(),
            limits: LabLimits::default(),
            lines: Default::default(),
        }
    }

    fn alloc(id: i64, host: i64, name: &str) -> Allocation {
        Allocation::new(id, host, &template(name), vec![1])
    }

    fn desktop(port: u16) -> DesktopAccess {
        DesktopAccess {
            username: "lr-a9".into(),
            rdp_port: port,
            ssh_port: port + 1,
            ssh_host_key: None,
            rdp_cert_sha256: None,
        }
    }

    #[test]
    fn happy_path_requested_to_released() {
        let mut a = alloc(9, 2, "gpu");
        let out = step(&mut a, Input::Tick, 0, &policy());
        assert_eq!(
            out[0],
            Output::Changed {
                from: S::Requested,
                to: S::Provisioning
            }
        );
        let task = issued(&out).expect("provision task");
        assert_eq!(task.id.0, "alloc-9-provision-1");
        assert_eq!(
            task.kind,
            TaskKind::Provision {
                allocation_id: 9,
                template: "gpu".into(),
                runtime: "local-user".into(),
                skeleton: "/srv/skel".into(),
                password: Password::default(),
                limits: LabLimits::default(),
                gpus: vec![1],
            }
        );
        let id = a.in_flight.clone().expect("in flight");
        let out = step(
            &mut a,
            Input::Report {
                id,
                outcome: TaskOutcome::Succeeded {
                    desktop: Some(desktop(42000)),
                },
            },
            10,
            &policy(),
        );
        assert_eq!(
            out,
            vec![
                Output::Desktop(desktop(42000)),
                Output::Changed {
                    from: S::Provisioning,
                    to: S::Active
                }
            ]
        );
        let out = step(&mut a, Input::ReleaseRequested, 20, &policy());
        assert_eq!(
            issued(&out).map(|t| t.id.0.as_str()),
            Some("alloc-9-release-2"),
            "the allocation's second task"
        );
        succeed(&mut a, 30);
        assert_eq!(a.state, S::Released);
        assert!(a.state.is_terminal());
    }

    #[test]
    fn failures_back_off_exponentially_then_give_up_with_a_reason() {
        let mut a = alloc(1, 1, "t");
        step(&mut a, Input::Tick, 0, &policy());
        assert!(fail(&mut a, 1_000).is_empty());
        assert_eq!(a.retry_at_ms, Some(3_000), "2 s after the first failure");
        assert!(
            issued(&step(&mut a, Input::Tick, 2_999, &policy())).is_none(),
            "not before the backoff"
        );
        let retry = step(&mut a, Input::Tick, 3_000, &policy());
        assert_eq!(
            issued(&retry).map(|t| t.id.0.as_str()),
            Some("alloc-1-provision-2")
        );
        fail(&mut a, 4_000);
        assert_eq!(a.retry_at_ms, Some(8_000), "4 s after the second failure");
        step(&mut a, Input::Tick, 8_000, &policy());
        let out = fail(&mut a, 9_000);
        assert_eq!(
            out,
            vec![Output::Changed {
                from: S::Provisioning,
                to: S::Failed
            }]
        );
        assert_eq!(a.reason.as_deref(), Some("gave up after 3 attempts: boom"));
        assert!(issued(&step(&mut a, Input::Tick, 100_000, &policy())).is_none());
    }

    #[test]
    fn stale_and_duplicate_reports_are_ignored() {
        let mut a = alloc(1, 1, "t");
        step(&mut a, Input::Tick, 0, &policy());
        let first = a.in_flight.clone().expect("in flight");
        fail(&mut a, 0);
        step(&mut a, Input::Tick, 2_000, &policy());
        // A late success for attempt 1 must not activate the allocation.
        let out = step(
            &mut a,
            Input::Report {
                id: first,
                outcome: TaskOutcome::done(),
            },
            2_100,
            &policy(),
        );
        assert!(matches!(out[..], [Output::Ignored { .. }]));
        assert_eq!(a.state, S::Provisioning);
        succeed(&mut a, 2_200);
        let again = step(
            &mut a,
            Input::Report {
                id: TaskId::new(1, "provision", 2),
                outcome: TaskOutcome::done(),
            },
            2_300,
            &policy(),
        );
        assert!(
            matches!(again[..], [Output::Ignored { .. }]),
            "a duplicate report changes nothing"
        );
        assert_eq!(a.state, S::Active);
    }

    #[test]
    fn a_silent_host_s_labs_wait_and_come_back_with_it() {
        let mut a = alloc(1, 1, "t");
        step(&mut a, Input::Tick, 0, &policy());
        succeed(&mut a, 1);
        let out = step(&mut a, Input::HostUnhealthy, 2, &policy());
        assert_eq!(
            out,
            vec![Output::Changed {
                from: S::Active,
                to: S::Unreachable
            }]
        );
        assert!(
            matches!(
                step(&mut a, Input::ResetRequested, 3, &policy())[..],
                [Output::Ignored { .. }]
            ),
            "no reset while unreachable"
        );
        let out = step(&mut a, Input::HostBack, 4, &policy());
        assert_eq!(
            out,
            vec![Output::Changed {
                from: S::Unreachable,
                to: S::Active
            }]
        );
        assert_eq!(
            (a.reason.as_deref(), a.resume_to, a.unreachable_since_ms),
            (None, None, None)
        );
        // A provisioning lab keeps its task out while the host is away, and takes its
        // report when the host answers it.
        let mut b = alloc(2, 1, "t");
        step(&mut b, Input::Tick, 0, &policy());
        let task = b.in_flight.clone().expect("in flight");
        step(&mut b, Input::HostUnhealthy, 1, &policy());
        assert_eq!(
            (b.state, b.in_flight.as_ref()),
            (S::Unreachable, Some(&task))
        );
        let out = step(
            &mut b,
            Input::Report {
                id: task,
                outcome: TaskOutcome::done(),
            },
            2,
            &policy(),
        );
        assert_eq!(
            out,
            vec![
                Output::Changed {
                    from: S::Unreachable,
                    to: S::Provisioning
                },
                Output::Changed {
                    from: S::Provisioning,
                    to: S::Active
                }
            ]
        );
    }

    #[test]
    fn past_the_grace_the_lab_fails_keeps_its_work_and_staff_resume_it() {
        let mut a = alloc(1, 1, "t");
        step(&mut a, Input::Tick, 0, &policy());
        succeed(&mut a, 1);
        assert!(
            matches!(
                step(&mut a, Input::Resume, 2, &policy())[..],
                [Output::Ignored { .. }]
            ),
            "an active lab is not resumed"
        );
        step(&mut a, Input::HostUnhealthy, 1_000, &policy());
        let out = step(&mut a, Input::GraceOver, 901_000, &policy());
        assert_eq!(
            out,
            vec![Output::Changed {
                from: S::Unreachable,
                to: S::Failed
            }]
        );
        assert!(
            a.reason
                .as_deref()
                .is_some_and(|r| r.contains("900 s") && r.contains("nothing was removed")),
            "{:?}",
            a.reason
        );
        assert!(
            step(&mut a, Input::HostBack, 902_000, &policy()).is_empty(),
            "a failed lab does not come back on its own"
        );
        assert_eq!(a.state, S::Failed);
        let out = step(&mut a, Input::Resume, 903_000, &policy());
        assert_eq!(
            out,
            vec![Output::Changed {
                from: S::Failed,
                to: S::Active
            }]
        );
        assert!(
            issued(&out).is_none(),
            "resuming issues nothing: the lab is as it was"
        );
        // A lab that failed for another reason cannot be resumed.
        let mut b = alloc(2, 1, "t");
        step(&mut b, Input::Tick, 0, &policy());
        for now in [1, 2_001, 6_001] {
            fail(&mut b, now);
            step(&mut b, Input::Tick, now + 60_000, &policy());
        }
        assert_eq!(b.state, S::Failed);
        assert!(matches!(
            step(&mut b, Input::Resume, 100_000, &policy())[..],
            [Output::Ignored { .. }]
        ));
    }

    #[test]
    fn unhealthy_hosts_and_staff_can_force_release() {
        let mut a = alloc(1, 1, "t");
        step(&mut a, Input::Tick, 0, &policy());
        succeed(&mut a, 1);
        step(&mut a, Input::HostUnhealthy, 2, &policy());
        step(&mut a, Input::GraceOver, 3, &policy());
        assert_eq!(a.state, S::Failed);
        // Release of a failed lab is tried (the host may come back) ...
        step(&mut a, Input::ReleaseRequested, 3, &policy());
        assert_eq!(a.state, S::Releasing);
        step(&mut a, Input::HostUnhealthy, 4, &policy());
        assert_eq!(a.state, S::Unreachable);
        step(&mut a, Input::GraceOver, 5, &policy());
        assert_eq!(a.state, S::ReleaseFailed);
        // ... and staff can always force it.
        let out = step(&mut a, Input::ForceRelease, 5, &policy());
        assert_eq!(
            out,
            vec![Output::Changed {
                from: S::ReleaseFailed,
                to: S::Released
            }]
        );
        assert!(matches!(
            step(&mut a, Input::ForceRelease, 6, &policy())[..],
            [Output::Ignored { .. }]
        ));
    }

    #[test]
    fn resets_keep_the_lab_active_rotate_credentials_and_retry() {
        let mut a = alloc(9, 2, "gpu");
        step(&mut a, Input::Tick, 0, &policy());
        succeed(&mut a, 1);
        let out = step(&mut a, Input::ResetRequested, 2, &policy());
        let task = issued(&out).expect("reset task");
        assert_eq!(task.id.0, "alloc-9-reset-2");
        assert_eq!(
            task.kind,
            TaskKind::Reset {
                allocation_id: 9,
                skeleton: "/srv/skel".into(),
                password: Password::default(),
                limits: LabLimits::default(),
                gpus: vec![1]
            },
            "a reset keeps the lab's limits and GPUs"
        );
        assert_eq!(a.state, S::Active);
        assert!(
            matches!(
                step(&mut a, Input::ResetRequested, 3, &policy())[..],
                [Output::Ignored { .. }]
            ),
            "one reset at a time"
        );
        fail(&mut a, 4);
        assert!(
            matches!(
                step(&mut a, Input::ResetRequested, 5, &policy())[..],
                [Output::Ignored { .. }]
            ),
            "a retry is pending"
        );
        let retry = step(&mut a, Input::Tick, 2_004, &policy());
        assert_eq!(
            issued(&retry).map(|t| t.id.0.as_str()),
            Some("alloc-9-reset-3")
        );
        let id = a.in_flight.clone().expect("in flight");
        let out = step(
            &mut a,
            Input::Report {
                id,
                outcome: TaskOutcome::Succeeded {
                    desktop: Some(desktop(42002)),
                },
            },
            2_100,
            &policy(),
        );
        assert_eq!(
            out,
            vec![Output::Desktop(desktop(42002)), Output::ResetDone]
        );
        assert_eq!(
            (a.state, a.in_flight.clone(), a.reason.clone()),
            (S::Active, None, None)
        );
        // A second reset gets an id no host has seen (a host runs each id once) and starts
        // from attempt 1; one that keeps failing gives up into failed.
        let out = step(&mut a, Input::ResetRequested, 3_000, &policy());
        assert_eq!(
            issued(&out).map(|t| t.id.0.as_str()),
            Some("alloc-9-reset-4")
        );
        assert_eq!(a.attempt, 1);
        for now in [3_001, 10_000, 20_000] {
            step(&mut a, Input::Tick, now, &policy());
            fail(&mut a, now);
        }
        assert_eq!(a.state, S::Failed);
        assert!(matches!(
            step(&mut a, Input::ResetRequested, 30_000, &policy())[..],
            [Output::Ignored { .. }]
        ));
    }

    #[test]
    fn release_during_a_reset_wins_and_the_late_reset_report_is_ignored() {
        let mut a = alloc(4, 1, "t");
        step(&mut a, Input::Tick, 0, &policy());
        succeed(&mut a, 1);
        step(&mut a, Input::ResetRequested, 2, &policy());
        let reset = a.in_flight.clone().expect("reset in flight");
        let out = step(&mut a, Input::ReleaseRequested, 3, &policy());
        assert_eq!(
            issued(&out).map(|t| t.id.0.as_str()),
            Some("alloc-4-release-3")
        );
        let late = step(
            &mut a,
            Input::Report {
                id: reset,
                outcome: TaskOutcome::done(),
            },
            4,
            &policy(),
        );
        assert!(matches!(late[..], [Output::Ignored { .. }]));
        assert_eq!(a.state, S::Releasing);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (1..=7).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.backoff(200), p.max_backoff);
    }
}
