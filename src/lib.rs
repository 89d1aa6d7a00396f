//! vtun: reach hosts behind a TLS-terminating, SNI-routing edge (Vers VMs at `<id>.vm.vers.sh:443`).
//!
//! The binary is a thin shell over this library: `cli` parses, `target` turns operands into typed
//! hosts and paths, `tls` dials the edge, `ssh` runs SSH over that stream, `link` is the seam
//! through which everything opens its streams on a VM (`mux` hands out links through background
//! masters that keep connections for reuse), `cmd` turns a subcommand's flags into typed
//! options, and the engines (`proxy`, `exec`, `transfer`, `sync`, `forward`, `gateway`) take
//! them; `fanout` runs them on many VMs.

pub mod agent;
pub mod cli;
pub mod cmd;
pub mod delta;
pub mod error;
pub mod exec;
pub mod fanout;
pub mod forward;
pub mod fs;
pub mod gateway;
pub mod link;
pub mod mux;
pub mod progress;
pub mod proxy;
pub mod settings;
pub mod sftp;
pub mod ssh;
pub mod sshconfig;
pub mod sync;
pub mod target;
pub mod tls;
pub mod transfer;
pub mod vers;
