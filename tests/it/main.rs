//! govsql's integration tests: one binary, against a real PostgreSQL the
//! harness starts on a private socket.

mod core;
mod guard_table;
mod harness;
mod seed_lock;
mod values;
