//! govsql: a governed remote psql executor.
//!
//! The data path of one job, module by module: [`catalog`] (the vocabulary)
//! → [`params`] (typed values, digest, literals) → [`guard`] (the parser
//! check) → [`runtime`] (plan / apply / verify, gates, ledger rows) →
//! [`psql`] (command line, script framing, output parser) → [`transport`]
//! (local psql or SSH). [`migrate`] installs the SQL substrate; [`switch`]
//! is the local apply switch; [`config`] and [`cli`] are the edges.

pub mod batch;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod guard;
pub mod migrate;
pub mod params;
pub mod psql;
pub mod runtime;
pub mod switch;
pub mod transport;
