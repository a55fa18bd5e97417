//! govsql: a governed remote psql executor.
//!
//! The data path of one job, module by module: [`protocol`] (the socket's
//! wire types) → [`daemon`] (socket, queue, workers) → [`job`] (the job's
//! vocabulary as types) → [`catalog`] (the commands) → [`params`] (typed
//! values, digest, literals) → [`guard`] (the parser check) → [`runtime`]
//! (plan / apply / verify, gates, ledger rows) → [`psql`] (command line,
//! script framing, the one reading of psql's answer) → [`transport`]
//! (local psql or SSH). [`migrate`] installs the SQL substrate; [`switch`]
//! is the local apply switch; [`config`], [`client`] and [`cli`] are the
//! edges. Nothing imports [`cli`].

pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod fleet;
pub mod freeze;
pub mod gate;
pub mod grammar;
pub mod guard;
pub mod job;
pub mod logging;
pub mod migrate;
pub mod params;
pub mod protocol;
pub mod psql;
pub mod rollout;
pub mod runtime;
pub mod sqlstate;
pub mod switch;
pub mod time;
pub mod transport;
