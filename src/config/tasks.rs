//! Prompt jobs: workers, queue bound, reclaim and the default answer mode.

use std::time::Duration;

use super::duration;

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Prompt jobs (tasks)")]
pub struct TaskArgs {
    /// Task workers per instance: the most upstream calls tasks make at once here.
    #[arg(
        long,
        env = "SLUICE_TASK_WORKERS",
        value_name = "SLUICE_TASK_WORKERS",
        default_value_t = 32
    )]
    pub task_workers: usize,
    /// Most tasks waiting in the embedded queue; beyond it new tasks get 503.
    #[arg(
        long,
        env = "SLUICE_TASK_QUEUE_MAX",
        value_name = "SLUICE_TASK_QUEUE_MAX",
        default_value_t = 10_000
    )]
    pub task_queue_max: usize,
    /// A task delivered to a worker that has not finished it after this long is given to
    /// another worker (Redis queue; covers crashed instances) (ms).
    #[arg(
        long,
        env = "SLUICE_TASK_RECLAIM_MS",
        value_name = "SLUICE_TASK_RECLAIM_MS",
        value_parser = duration::millis,
        default_value = "60000"
    )]
    pub task_reclaim_ms: Duration,
    /// Whether task creation answers 202 at once (true) or waits for the result (false);
    /// `?sync=` on a request overrides it.
    #[arg(long, env = "SLUICE_TASKS_ASYNC_DEFAULT", value_name = "SLUICE_TASKS_ASYNC_DEFAULT", default_value_t = true, action = clap::ArgAction::Set)]
    pub tasks_async_default: bool,
}

#[derive(Debug, Clone)]
pub struct TaskConfig {
    pub workers: usize,
    pub queue_max: usize,
    pub reclaim_idle: Duration,
    pub async_default: bool,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            workers: 32,
            queue_max: 10_000,
            reclaim_idle: Duration::from_secs(60),
            async_default: true,
        }
    }
}

impl TaskConfig {
    /// Whether zero workers is allowed depends on Redis: `Config::validate` checks it.
    pub fn from_args(args: &TaskArgs) -> Self {
        Self {
            workers: args.task_workers,
            queue_max: args.task_queue_max,
            reclaim_idle: args.task_reclaim_ms,
            async_default: args.tasks_async_default,
        }
    }
}
