//! One module per kernel hook.

pub mod sched_migrate_task;
