//! The coordinator: planning users into folder jobs ([`planner`]), the one-command
//! embedded mode ([`embedded`]), progress and summaries ([`report`]) and the command
//! line ([`cli`]); the admin's HTTP API and web console ([`api`]).

pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod embedded;
pub mod ops;
pub mod planner;
pub mod report;
pub mod scheduler;
