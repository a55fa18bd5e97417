//! Log output: `tracing` lines on stderr, shaped for where stderr goes.
//!
//! Under systemd with stderr connected to the journal (`JOURNAL_STREAM`
//! names stderr's device and inode), each line starts with its syslog
//! priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) so that
//! `journalctl -p err` finds errors, and carries no timestamp of its own
//! (the journal adds one). Colour only on a terminal, never with
//! `NO_COLOR` set.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// Whether stderr is the journal's stream (systemd sets `JOURNAL_STREAM`
/// to `DEVICE:INODE` of the stream it connected).
pub fn stderr_is_journal() -> bool {
    is_journal(std::io::stderr())
}

/// Whether stdout is the journal's stream (a unit's `StandardOutput=`
/// default): a line there may start with its syslog priority too.
pub fn stdout_is_journal() -> bool {
    is_journal(std::io::stdout())
}

fn is_journal(stream: impl std::os::fd::AsFd) -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(stream) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// The syslog priority of a level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Prefixes each event with its syslog priority.
struct Prioritized<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the subscriber: `GOVSQL_LOG` (an `EnvFilter`) or `default`.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GOVSQL_LOG")
        .unwrap_or_else(|_| default.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false);
        let _ = builder.event_format(Prioritized(format)).try_init();
    } else {
        let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let _ = builder.with_ansi(colour).try_init();
    }
}

/// Prints a fatal error on stderr (with the error priority in the journal).
pub fn fatal(message: impl fmt::Display) {
    if stderr_is_journal() {
        eprintln!("<3>govsql: {message}");
    } else {
        eprintln!("govsql: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }
}
