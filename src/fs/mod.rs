//! File safety shared by cp and sync: metadata types, and (as they move here) local handles,
//! atomic temp-and-commit and safe descent beneath a destination root.

pub mod time;

pub use time::FileTime;
