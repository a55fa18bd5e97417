//! The socket protocol: one JSON object per line, request and reply, each
//! with a protocol version. Typed requests and replies; the daemon answers
//! every line, malformed ones included, with a reply that says what to do.

use serde::{Deserialize, Serialize};

use crate::runtime::{Mode, Outcome};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line accepted.
pub const MAX_LINE: usize = 1024 * 1024;

/// A client request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Queue a job.
    Submit {
        /// Protocol version.
        v: u32,
        /// The catalog command.
        command: String,
        /// plan, apply or verify.
        mode: Mode,
        /// `[name, value]` pairs.
        #[serde(default)]
        params: Vec<(String, String)>,
        /// The target (default: the config's default).
        #[serde(default)]
        target: Option<String>,
        /// The idempotency key (default: `job:<job_id>`).
        #[serde(default)]
        idempotency_key: Option<String>,
        /// Answer only once the job is terminal (result included).
        #[serde(default)]
        wait: bool,
        /// With `wait`: give up waiting after this long (the job goes on).
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// A job's state.
    Status {
        /// Protocol version.
        v: u32,
        /// The job.
        job_id: String,
    },
    /// Wait until a job is terminal (or the wait times out).
    Wait {
        /// Protocol version.
        v: u32,
        /// The job.
        job_id: String,
        /// Give up after this long (default 3600 s).
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// Recent jobs.
    List {
        /// Protocol version.
        v: u32,
        /// At most this many (default 100).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Approve a job that waits for approval.
    Approve {
        /// Protocol version.
        v: u32,
        /// The job.
        job_id: String,
    },
    /// Cancel a queued or waiting job.
    Cancel {
        /// Protocol version.
        v: u32,
        /// The job.
        job_id: String,
    },
    /// The daemon's health.
    Health {
        /// Protocol version.
        v: u32,
    },
}

/// A job as clients see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobView {
    /// The job.
    pub job_id: String,
    /// The command.
    pub command: String,
    /// The mode.
    pub mode: Mode,
    /// The target.
    pub target: String,
    /// queued, awaiting_approval, running, or a terminal status.
    pub state: String,
    /// The unix user who submitted it.
    pub actor: String,
    /// md5 params digest.
    pub params_digest: String,
    /// The idempotency key.
    pub idempotency_key: String,
    /// When it was submitted (unix seconds).
    pub submitted_at: i64,
    /// When it ended (unix seconds).
    pub finished_at: Option<i64>,
    /// Who approved it.
    pub approved_by: Option<String>,
    /// The outcome, once terminal (`result` only for the submitter's wait).
    pub outcome: Option<Outcome>,
}

/// The daemon's health.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// Daemon pid.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Jobs per state.
    pub jobs: std::collections::BTreeMap<String, i64>,
    /// Whether every worker answered its last heartbeat.
    pub workers_alive: bool,
    /// Seconds since the last watchdog heartbeat.
    pub last_heartbeat_s: u64,
    /// The local apply switch.
    pub apply_switch: bool,
    /// The catalog digest in use.
    pub catalog_digest: String,
    /// Targets and their transports.
    pub targets: Vec<String>,
}

/// A reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Protocol version.
    pub v: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// On failure: what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
    /// submit, status, wait, approve, cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobView>,
    /// list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Vec<JobView>>,
    /// health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// Why a request failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplyError {
    /// A fixed word: bad_request, version, too_long, denied, not_found,
    /// conflict, unknown_command, internal, timeout.
    pub kind: String,
    /// What to do about it.
    pub message: String,
}

impl Reply {
    /// A success with nothing attached.
    pub fn ok() -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            ok: true,
            error: None,
            job: None,
            jobs: None,
            health: None,
        }
    }

    /// A success carrying a job.
    pub fn job(job: JobView) -> Reply {
        Reply {
            job: Some(job),
            ..Reply::ok()
        }
    }

    /// A failure.
    pub fn error(kind: &str, message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(ReplyError {
                kind: kind.to_string(),
                message: message.into(),
            }),
            ..Reply::ok()
        }
    }
}

/// Parses one request line; the error is the reply to send.
pub fn parse_request(line: &[u8]) -> Result<Request, Box<Reply>> {
    let bad = |msg: String| Box::new(Reply::error("bad_request", msg));
    let text = std::str::from_utf8(line).map_err(|_| bad("request is not UTF-8".into()))?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "request is not one JSON object per line: {}",
            redact_quoted(&e.to_string())
        ))
    })?;
    let v = value.get("v").and_then(|v| v.as_u64());
    if v != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(Box::new(Reply::error(
            "version",
            format!("protocol version {PROTOCOL_VERSION} expected (field \"v\"); is the client up to date?"),
        )));
    }
    serde_json::from_value(value).map_err(|e| {
        bad(format!(
            "unexpected message ({}); is the client up to date?",
            redact_quoted(&e.to_string())
        ))
    })
}

/// serde quotes offending values between backticks; a param value must
/// never be echoed, so every quoted part is dropped.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut inside = false;
    for c in msg.chars() {
        if c == '`' {
            if !inside {
                out.push('…');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_get_reasons() {
        let r = parse_request(
            br#"{"v":1,"op":"submit","command":"dot_iu_healthcheck","mode":"verify"}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Submit {
                mode: Mode::Verify,
                ..
            }
        ));
        for (line, kind) in [
            (&b"not json"[..], "bad_request"),
            (br#"{"v":2,"op":"health"}"#, "version"),
            (br#"{"op":"health"}"#, "version"),
            (br#"{"v":1,"op":"explode"}"#, "bad_request"),
            (br#"{"v":1,"op":"status"}"#, "bad_request"),
            (br#"{"v":1,"op":"health","extra":1}"#, "bad_request"),
            (b"\xff\xfe", "bad_request"),
        ] {
            let err = parse_request(line).unwrap_err();
            assert_eq!(
                err.error.unwrap().kind,
                kind,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_wrong_field_value_is_not_echoed() {
        for line in [
            &br#"{"v":1,"op":"submit","command":"x","mode":"CANARY-123"}"#[..],
            br#"{"v":1,"op":"submit","command":"x","mode":"plan","params":[["a",987654321]]}"#,
            br#"{"v":1,"op":"submit","command":"x","mode":"plan","params":[["a","CANARY-123","x"]]}"#,
        ] {
            let msg = parse_request(line).unwrap_err().error.unwrap().message;
            assert!(!msg.contains("CANARY") && !msg.contains("987654321"), "{msg}");
        }
    }
}
