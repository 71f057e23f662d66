//! The coordinator: planning users into folder jobs ([`planner`]), the coordinator
//! process that schedules passes ([`scheduler`]), the admin's records and actions on
//! Redis ([`admin`], for `mailferry batch` and the API), the one-command embedded mode
//! ([`embedded`]), progress and summaries ([`report`]), the command line ([`cli`]), the
//! admin's HTTP API and web console ([`api`]) with its client ([`client`]), and the
//! metrics and health endpoint ([`ops`]).

pub mod admin;
pub mod api;
pub mod cli;
pub mod client;
pub mod embedded;
pub mod ops;
pub mod planner;
pub mod report;
pub mod scheduler;
