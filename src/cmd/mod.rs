pub mod exec;
pub mod ssh;
