//! pin: what an apply of a job would be pinned to now (its plan digest
//! and what it covers), asked of the database's `fn_dot_iu_pin` entry,
//! which runs and records nothing. The daemon pins a job that needs
//! approval when it is submitted, so its approvers approve that plan and
//! the dispatcher refuses the apply (`plan_drift`) if anything it covers
//! moved by then; so is an apply still waiting a second after its submit
//! (`daemon/worker.rs`, `pin_waiting`, through [`Runtime::pin_many`]). A pin is a read: it runs on the
//! target's read channel, never in a job's slot.

use serde::Deserialize;

use super::calls;
use super::*;
use crate::psql::copy_rows;

/// The plan an apply is pinned to.
#[derive(Debug, Clone, PartialEq)]
pub struct Pin {
    /// sha256 hex of what it covers.
    pub digest: String,
    /// What it covers: target, command, params digest, catalog digest,
    /// each target function's definition md5, gates, max_rows.
    pub covers: serde_json::Value,
}

#[derive(Deserialize)]
struct PinRow {
    plan_digest: Option<String>,
    plan_covers: Option<serde_json::Value>,
    class: Option<String>,
}

impl Runtime {
    /// Pins `job` to the plan it would run now. An error says why in
    /// words (an unknown command, bad params, the target unreachable).
    pub async fn pin(&self, job: &Job) -> Result<Pin, String> {
        self.pin_many(std::slice::from_ref(job))
            .await?
            .pop()
            .unwrap_or_else(|| Err("no pin came back".into()))
    }

    /// Pins several jobs in one script (one round trip): each job's pin,
    /// or why not; an error when the script itself could not run.
    pub async fn pin_many(&self, jobs: &[Job]) -> Result<Vec<Result<Pin, String>>, String> {
        // Each job's section in the script, or why it has none.
        let mut sections: Vec<Result<usize, String>> = Vec::with_capacity(jobs.len());
        let mut script = None;
        let mut tag = String::new();
        let mut n = 0;
        for job in jobs {
            let ctx = match self.context(job) {
                Ok(ctx) => ctx,
                Err(o) => {
                    sections.push(Err(o.message));
                    continue;
                }
            };
            let params = Self::params_json(&ctx);
            // The job's id is in what the plan covers: a plan pinned for
            // one job is drift for any other, however alike their values.
            let client = ClientFacts {
                target: Some(self.target.clone()),
                job_id: Some(job.job_id.to_string()),
                ..ClientFacts::default()
            };
            let s = script.get_or_insert_with(|| {
                tag = self.tag(&ctx);
                self.script(&ctx)
            });
            s.section();
            s.sql(&calls::statement(&calls::Pin {
                command: &ctx.cmd.name,
                params: &params,
                client: &client,
            }));
            sections.push(Ok(n));
            n += 1;
        }
        let Some(s) = script else {
            // No job had a section: each answer is why not.
            return Ok(sections
                .into_iter()
                .filter_map(Result::err)
                .map(Err)
                .collect());
        };
        // A read (the target's read channel, its warm read session): a pin
        // never takes the job slot a waiting job is waiting for.
        let script = s.finish();
        let read = crate::transport::run_read_script(
            self.executor.as_ref(),
            &script,
            &tag,
            self.job_timeout,
        );
        let secs = match read.await {
            PsqlResult::Complete(secs) => secs,
            PsqlResult::SqlError { state, .. } if state == "42883" => {
                return Err(
                    "the database has no fn_dot_iu_pin yet: run `govsql migrate` on the target"
                        .into(),
                )
            }
            other => return Err(format!("the plan could not be pinned: {other}")),
        };
        Ok(sections
            .into_iter()
            .map(|s| s.and_then(|n| read_pin(n, secs.get(n).unwrap_or_default())))
            .collect())
    }
}

/// One pin section's answer.
fn read_pin(n: usize, section: &[u8]) -> Result<Pin, String> {
    let rows = copy_rows(n, section).map_err(|e| e.to_string())?;
    let value = match rows.as_slice() {
        [r] if r.len() == 2 && r[0].as_deref() == Some("pin") => r[1].clone(),
        _ => None,
    }
    .ok_or("the pin entry answered something else than one pin row")?;
    let row: PinRow = serde_json::from_str(&value)
        .map_err(|_| "the pin entry's answer is not the promised JSON".to_string())?;
    match row {
        PinRow {
            plan_digest: Some(digest),
            plan_covers: Some(covers),
            class: None,
        } if crate::job::valid_plan_digest(&digest) && covers.is_object() => {
            Ok(Pin { digest, covers })
        }
        PinRow { class: Some(c), .. } => Err(format!(
            "the database refuses these params ({c}); the job will be refused when it runs"
        )),
        _ => Err("the pin entry's answer is malformed".into()),
    }
}
