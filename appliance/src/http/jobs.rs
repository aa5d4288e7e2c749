//! Staff's view of the durable job queue (`crate::jobs`): list by state, inspect one,
//! requeue a dead or cancelled job, cancel a queued or running one. Every change is audited.

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::extract::ApiPath;
use super::problem::Problem;
use crate::audit;
use crate::error::Error;
use crate::jobs::{self, Job, JobError};
use labrack_provisioner::roles;

const STATES: [&str; 5] = ["queued", "running", "succeeded", "dead", "cancelled"];

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    /// queued, running, succeeded, dead (the dead letters) or cancelled; all when absent
    #[param(pattern = "^(queued|running|succeeded|dead|cancelled)$")]
    pub state: Option<String>,
    /// at most this many (1–1000, default 100), most recently changed first
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobsPage {
    pub jobs: Vec<Job>,
}

impl From<JobError> for Error {
    fn from(error: JobError) -> Self {
        match error {
            JobError::Sqlite(e) => e.into(),
            JobError::Invalid(detail) => Error::invalid("job", detail),
            JobError::NotFound(_) => Error::NotFound("job"),
            wrong @ (JobError::WrongState { .. } | JobError::LeaseLost(_)) => {
                Error::conflict(Some("state"), wrong.to_string())
            }
        }
    }
}

/// Jobs by state, most recently changed first.
#[utoipa::path(get, operation_id = "list_jobs", path = "/v1/jobs", tag = "jobs", params(JobsQuery),
    responses((status = 200, body = JobsPage), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobsPage>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::invalid("limit", "limit must be between 1 and 1000"));
    }
    if let Some(wanted) = &query.state
        && !STATES.contains(&wanted.as_str())
    {
        return Err(Error::invalid(
            "state",
            format!("state must be one of {}", STATES.join(", ")),
        ));
    }
    let jobs = state
        .db
        .read(move |conn| jobs::list(conn, query.state.as_deref(), limit).map_err(Error::from))
        .await?;
    Ok(Json(JobsPage { jobs }))
}

/// One job, with its attempts, lease and last error.
#[utoipa::path(get, operation_id = "get_job", path = "/v1/jobs/{job_id}", tag = "jobs", params(("job_id" = i64, Path)),
    responses((status = 200, body = Job), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Job>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let job = state
        .db
        .read(move |conn| jobs::get(conn, id).map_err(Error::from))
        .await?;
    job.map(Json).ok_or(Error::NotFound("job"))
}

async fn change(
    state: AppState,
    caller: Caller,
    id: i64,
    action: &'static str,
) -> Result<Json<Job>, Error> {
    caller.require_staff(&roles::OPERATORS)?;
    let now = crate::clock::now_ms();
    let job = state
        .db
        .writer()
        .write(move |conn| {
            match action {
                "job.requeued" => {
                    jobs::requeue(conn, id, now)?;
                    crate::checks::on_requeue(conn, id)?;
                }
                _ => {
                    jobs::cancel(conn, id, now)?;
                    crate::checks::settle_ended_jobs(conn, now)?;
                }
            }
            audit::record(
                conn,
                &caller.actor(),
                &caller.meta,
                action,
                Some(&format!("job:{id}")),
                serde_json::json!({}),
            )?;
            jobs::get(conn, id)?.ok_or(Error::NotFound("job"))
        })
        .await?;
    state.wake_workers();
    Ok(Json(job))
}

/// Puts a dead or cancelled job back in the queue; its attempts start over.
#[utoipa::path(post, path = "/v1/jobs/{job_id}/requeue", tag = "jobs", params(("job_id" = i64, Path)),
    responses((status = 200, body = Job), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn requeue(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Job>, Error> {
    change(state, caller, id, "job.requeued").await
}

/// Stops a queued or running job; a worker's later answer for it is refused.
#[utoipa::path(post, path = "/v1/jobs/{job_id}/cancel", tag = "jobs", params(("job_id" = i64, Path)),
    responses((status = 200, body = Job), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Job>, Error> {
    change(state, caller, id, "job.cancelled").await
}
