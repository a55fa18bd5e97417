//! govsql's integration tests: one binary, against a real PostgreSQL and a
//! real OpenSSH sshd that the harness starts on loopback.

mod abuse;
mod approvals;
mod cli;
mod core;
mod daemon;
mod exposure;
mod faults;
mod fleet;
mod gate;
mod governance;
mod grammar;
mod guard_table;
mod harness;
mod hostile;
mod layout;
mod limits;
mod operate;
mod pinned;
mod rollouts;
mod secrets;
mod seed_lock;
mod service;
mod session;
mod settle;
mod socket;
mod ssh;
mod sshd;
mod upgrade;
mod values;
