//! Command-line definitions. Flags are documentation: the first `///` line is the short help,
//! later paragraphs the long help; each option names its default and environment variable.
//!
//! Connection options are global (accepted before or after the subcommand) except `-i/--identity`,
//! which each connecting subcommand declares itself because `vtun sync -i` means `--itemize`, as in
//! rsync.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Reach VMs behind a TLS edge: ProxyCommand, exec, ssh, cp, sync and forward over verified TLS.
///
/// A VM is `[user@]NAME`: a NAME without a dot becomes `NAME.<domain>` (default vm.vers.sh); a
/// NAME with a dot is used as is. A remote path is `VM:PATH`; as with scp, a `/` before the first
/// `:` makes an operand local.
///
/// The vers CLI's names work everywhere: an alias from ~/.vers/aliases.json, or HEAD (the VM in
/// ./.vers/HEAD), is resolved to the VM's id first. With a Vers API key (VERS_API_KEY or apiKey
/// in ~/.versrc; API at VERS_URL, default https://api.vers.sh) vtun fetches a VM's key when it
/// has none that works, names a VM the account does not have, and resumes a paused one.
///
/// Exit status: the remote command's status when there is one; 255 when vtun could not connect,
/// authenticate, or lost the connection; 23/24 for a partial `vtun sync` (as rsync's); 1 for
/// other failures.
#[derive(Debug, Parser)]
#[command(name = "vtun", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every connecting subcommand shares.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection options")]
pub struct GlobalArgs {
    /// Dial HOST:PORT instead of the VM's own name.
    ///
    /// SNI and certificate verification still use the VM's name, so this is safe for private
    /// edges, tunnels and tests.
    #[arg(long, global = true, env = "VTUN_CONNECT", value_name = "HOST:PORT")]
    pub connect: Option<String>,

    /// Also trust the CA certificates in this PEM file (repeatable).
    ///
    /// The edge is always verified against the public web roots; this adds roots for private
    /// edges and the test bed.
    #[arg(long, global = true, env = "VTUN_CA_FILE", value_name = "PEM")]
    pub ca_file: Vec<PathBuf>,

    /// Do not verify the edge's TLS certificate (dangerous; warns on every use).
    #[arg(long, global = true, env = "VTUN_INSECURE")]
    pub insecure: bool,

    /// Domain appended to VM names without a dot [default: vm.vers.sh].
    ///
    /// When unset, VERS_URL=https://api.X selects vm.X, as the vers CLI does.
    #[arg(long, global = true, env = "VTUN_DOMAIN", value_name = "NAME")]
    pub domain: Option<String>,

    /// TLS port of the edge.
    #[arg(
        long,
        global = true,
        env = "VTUN_PORT",
        default_value_t = 443,
        value_name = "N"
    )]
    pub port: u16,

    /// Remote user name [default: root].
    #[arg(
        short = 'l',
        long,
        global = true,
        env = "VTUN_USER",
        value_name = "NAME"
    )]
    pub user: Option<String>,

    /// Known-hosts file for host-key pinning [default: <config dir>/vtun/known_hosts].
    #[arg(long, global = true, env = "VTUN_KNOWN_HOSTS", value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,

    /// What to do with the VM's SSH host key.
    ///
    /// accept-new: pin unknown hosts on first use, refuse changed keys; yes: refuse unknown
    /// hosts too; no: accept anything (not recommended).
    #[arg(
        long,
        global = true,
        env = "VTUN_HOST_KEY_CHECK",
        value_enum,
        default_value_t = HostKeyCheck::AcceptNew,
        value_name = "POLICY"
    )]
    pub host_key_check: HostKeyCheck,

    /// Give up connecting after SECS (never applies to a running session).
    #[arg(
        long,
        global = true,
        env = "VTUN_CONNECT_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECS"
    )]
    pub connect_timeout: f64,

    /// Keep retrying for SECS while the VM is still booting (refused or reset connections).
    #[arg(
        long,
        global = true,
        env = "VTUN_WAIT",
        default_value_t = 30.0,
        value_name = "SECS"
    )]
    pub wait: f64,

    /// Do not resume a paused or sleeping VM through the Vers API; say how to resume it instead.
    ///
    /// With an API key (VERS_API_KEY or ~/.versrc), a VM that refuses connections is looked
    /// up: an unknown VM fails at once, a paused or sleeping one is resumed and waited for.
    #[arg(long, global = true, env = "VTUN_NO_RESUME")]
    pub no_resume: bool,
    /// Keep the connection to a VM open in a background master for SECS after the last
    /// command, so the next command to it skips the connection setup (0: no master).
    ///
    /// The first command to a VM starts the master (`vtun master list` shows them); later
    /// commands with the same user, VM, port, --connect, trust settings and identities reuse its
    /// SSH connection. A master that is gone or does not answer is passed by: the command
    /// connects directly.
    #[arg(
        long,
        global = true,
        env = "VTUN_PERSIST",
        default_value_t = 60.0,
        value_name = "SECS"
    )]
    pub persist: f64,

    /// More diagnostics on stderr (repeat for more; RUST_LOG also works).
    #[arg(short = 'v', long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(short = 'q', long, global = true)]
    pub quiet: bool,
}

/// `-i/--identity`, declared per subcommand (see the module docs).
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Connection options")]
pub struct IdentityArgs {
    /// Private key file to authenticate with (repeatable; tried first, in order).
    ///
    /// Then keys in ssh-agent (SSH_AUTH_SOCK), the key the vers CLI caches for the VM
    /// ($TMPDIR/vers-ssh-keys/<vmId>.key), with a Vers API key the VM's key from the API when
    /// that one is missing or refused (written to that cache, mode 0600), then ~/.ssh/id_ed25519,
    /// id_ecdsa, id_rsa.
    #[arg(
        short = 'i',
        long,
        env = "VTUN_IDENTITY",
        value_name = "FILE",
        value_delimiter = ':'
    )]
    pub identity: Vec<PathBuf>,
}

/// `--host-key-check` values (the command layer maps them to `ssh::HostKeyCheck`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HostKeyCheck {
    /// Pin on first use, refuse a changed key.
    AcceptNew,
    /// Refuse unknown and changed keys.
    Yes,
    /// Accept any key (no protection against a man in the middle).
    No,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// ProxyCommand: relay stdin/stdout over verified TLS to HOST (use as `vtun proxy %h`).
    ///
    /// Example: ssh -o ProxyCommand="vtun proxy %h" root@<vmId>.vm.vers.sh
    ///
    /// stdout carries only the stream; errors are one `vtun:` line on stderr and exit 255.
    Proxy(ProxyArgs),
    /// Interactive shell on a VM (PTY when stdin is a terminal), or run CMD like `ssh VM CMD`.
    ///
    /// With no VM, the VM in ./.vers/HEAD, as `vers` commands do. A command needs a VM before it
    /// (`vtun ssh HEAD uptime`): the first operand is always the VM.
    ///
    /// With -L, -R or -D (before CMD), also forwards ports as `vtun forward` does, for as long as
    /// the shell or command runs.
    Ssh(SshArgs),
    /// Run a command on a VM: stdout/stderr kept apart, stdin streamed, remote exit status.
    ///
    /// The command starts at the first operand after VM, as with ssh and docker exec; each of
    /// its arguments is quoted for the remote shell, so `vtun exec vm ls "a b"` lists one file
    /// named `a b`. With `--sh`, a single argument is run as a shell line instead
    /// (`vtun exec vm --sh 'cd /srv && ls | wc -l'`).
    Exec(ExecArgs),
    /// Copy files local→VM, VM→local or VM→VM, like scp but faster and atomic.
    ///
    /// Every file is written under a temporary name and renamed into place when complete, so a
    /// failed copy never leaves a truncated file under the final name.
    Cp(CpArgs),
    /// Sync a tree like `rsync -a`: quick check, delta transfer, --delete, excludes.
    ///
    /// A trailing `/` on SRC means "the contents of SRC", as in rsync.
    Sync(SyncArgs),
    /// Forward ports to and from a VM (-L, -R, -D as with ssh) until Ctrl-C, across reconnects.
    ///
    /// Says on stderr, one line per forward, what listens where. Listeners stay open when the
    /// connection is lost: connections that were open through it close, and the next one (or,
    /// with -R, a check every 2 s) reconnects and asks the VM for the -R listeners again.
    /// Ctrl-C or SIGTERM stops it (exit 0); a local port already in use is exit 1.
    Forward(ForwardArgs),
    /// Measure the path to a VM: setup time, round trip, upload and download speed.
    Bench(BenchArgs),
    /// The server half: a TLS edge that routes connections by SNI to TCP backends.
    Gateway(GatewayArgs),
    /// Print an ssh_config block so plain ssh, scp and rsync reach VMs through vtun.
    ///
    /// Append it to ~/.ssh/config: vtun ssh-config >> ~/.ssh/config
    SshConfig(SshConfigArgs),
    /// Print shell completions for SHELL to stdout.
    Completions(CompletionsArgs),
    /// The background masters that hold connections for reuse: list or stop them.
    ///
    /// The first connecting command to a VM starts one; it keeps the SSH connection for
    /// --persist seconds (default 60) after the last channel closes. Sockets and logs live in
    /// $XDG_RUNTIME_DIR/vtun (else ~/.cache/vtun), private to this user.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
            vtun master list                 VM, pid, idle seconds, open channels\n  \
            vtun master list --json          for scripts: [{\"host\": …, \"pid\": …}, …]\n  \
            vtun master stop vm1             end vm1's master\n  \
            vtun master stop                 end them all"
    )]
    Master(MasterCommand),
    /// Remote helper for `vtun sync` (speaks a framed protocol on stdin/stdout).
    #[command(hide = true)]
    Agent,
}

#[derive(Debug, Subcommand)]
pub enum MasterCommand {
    /// One row per held connection: VM, pid, idle seconds, open channels.
    List(MasterListArgs),
    /// End the master for VM, or every master when no VM is given.
    Stop(MasterStopArgs),
    /// Run a master in the foreground (what commands start in the background).
    #[command(hide = true)]
    Serve(MasterServeArgs),
}

#[derive(Debug, Args)]
pub struct MasterListArgs {
    /// Print a JSON array of objects (host, user, port, pid, idle_secs, channels, connections).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MasterStopArgs {
    /// The VM whose master to stop: [user@]NAME (all masters when omitted).
    #[arg(value_name = "VM")]
    pub vm: Option<String>,
}

#[derive(Debug, Args)]
pub struct MasterServeArgs {
    /// The socket to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The VM: [user@]NAME[:PORT].
    #[arg(value_name = "VM")]
    pub vm: String,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Host to reach: a VM id, a vers alias, HEAD, a full name, or NAME:PORT.
    #[arg(value_name = "HOST")]
    pub host: String,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// Force a PTY even when stdin is not a terminal.
    #[arg(short = 't', conflicts_with = "no_tty")]
    pub tty: bool,
    /// Never allocate a PTY.
    #[arg(short = 'T')]
    pub no_tty: bool,
    /// The VM: [user@]NAME, an alias or HEAD [default: HEAD, the VM in ./.vers/HEAD].
    #[arg(value_name = "VM")]
    pub vm: Option<String>,
    /// Command to run instead of a login shell (joined with spaces, as ssh does).
    #[arg(
        value_name = "CMD",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
    #[command(flatten)]
    pub forwards: ForwardFlags,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("forwards").args(["local", "remote", "dynamic"]).multiple(true).required(true)),
    after_help = "Examples:\n  \
        vtun forward vm -L 5432:localhost:5432            the VM's postgres on 127.0.0.1:5432 here\n  \
        vtun forward vm -L 8080:10.0.0.5:80 -L 9229:localhost:9229\n  \
        vtun forward vm -L /tmp/pg.sock:/run/postgresql/.s.PGSQL.5432\n  \
        vtun forward vm -R 0:localhost:3000                a port on the VM (it picks) → :3000 here\n  \
        vtun forward vm -D 1080                            curl --socks5-hostname 127.0.0.1:1080 …"
)]
pub struct ForwardArgs {
    /// The VM: [user@]NAME.
    #[arg(value_name = "VM")]
    pub vm: String,
    #[command(flatten)]
    pub forwards: ForwardFlags,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

/// `-L`, `-R`, `-D` (for `vtun forward` and `vtun ssh`), in OpenSSH's syntax.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Forwarding (as with ssh)")]
pub struct ForwardFlags {
    /// Listen here, connect from the VM: [BIND:]PORT:HOST:HOSTPORT (repeatable).
    ///
    /// Also [BIND:]PORT:REMOTE_SOCKET, LOCAL_SOCKET:HOST:HOSTPORT and LOCAL_SOCKET:REMOTE_SOCKET:
    /// a field with a `/` is a Unix socket path. BIND defaults to 127.0.0.1; `*` or an empty
    /// BIND listens on all addresses; PORT 0 takes a free port. HOST is resolved on the VM.
    #[arg(short = 'L', value_name = "SPEC")]
    pub local: Vec<String>,
    /// Listen on the VM, connect from here: [BIND:]PORT:HOST:HOSTPORT (repeatable).
    ///
    /// Also [BIND:]PORT:LOCAL_SOCKET, REMOTE_SOCKET:HOST:HOSTPORT, REMOTE_SOCKET:LOCAL_SOCKET,
    /// and [BIND:]PORT alone: a SOCKS5 proxy on the VM whose connections start here. BIND
    /// defaults to the VM's loopback; `*` asks for all addresses (its sshd grants that only with
    /// GatewayPorts). PORT 0 lets the VM pick one, which is printed.
    #[arg(short = 'R', value_name = "SPEC")]
    pub remote: Vec<String>,
    /// A SOCKS5 proxy here whose connections start on the VM: [BIND:]PORT (repeatable).
    ///
    /// CONNECT to IPv4, IPv6 and host names, resolved on the VM (curl --socks5-hostname); no
    /// authentication.
    #[arg(short = 'D', value_name = "[BIND:]PORT")]
    pub dynamic: Vec<String>,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    vtun exec vm uname -a\n  \
    vtun exec vm --cd /srv/app --env RUST_LOG=debug ./run.sh \"arg with spaces\"\n  \
    tar cz ./data | vtun exec vm tar xz -C /srv\n  \
    vtun exec vm -- -command-starting-with-a-dash\n  \
    vtun exec vm --sh 'journalctl -u app | tail -n 50'\n\n\
    Many VMs: a comma list, glob patterns over vers aliases, or --hosts FILE:\n  \
    vtun exec vm1,vm2,vm3 -- uptime            each line prefixed 'NAME: '\n  \
    vtun exec 'worker-*' --gather -- git rev-parse HEAD\n  \
    vtun exec --hosts fleet.txt --timeout 60 --failed retry.txt -- ./deploy.sh\n\n\
    Exit status with many VMs: 0 all succeeded; 255 any could not be reached or lost its\n\
    connection; else 124 any timed out; else the highest remote exit status. A summary of\n\
    each kind, with names, closes the run on stderr.")]
pub struct ExecArgs {
    /// Allocate a PTY (stdout and stderr are then merged, as with ssh -t).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Run the single argument as a shell command line instead of quoting each argument.
    #[arg(long)]
    pub sh: bool,
    /// Set an environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Run the command in this remote directory.
    #[arg(long = "cd", value_name = "DIR")]
    pub cd: Option<String>,
    /// The VM: [user@]NAME (an id, a vers alias or HEAD), or a list (`vm1,vm2`,
    /// `'worker-*'` over vers aliases). Absent with --hosts.
    #[arg(value_name = "VM", required_unless_present = "hosts")]
    pub vm: Option<String>,
    /// The command and its arguments. The first operand after VM starts it and everything
    /// from there on belongs to it, flags included (`vtun exec vm ls -la`); options for vtun
    /// go before it. `--` before the command also works (needed when it starts with `-`).
    #[arg(
        value_name = "CMD",
        required_unless_present = "hosts",
        trailing_var_arg = true
    )]
    pub command: Vec<String>,
    /// With many VMs: print each VM's output at the end, VMs with identical output and status
    /// grouped under one header (clush -b).
    #[arg(long, conflicts_with = "json", help_heading = "Many VMs")]
    pub gather: bool,
    /// With many VMs: one JSON object per VM and line (name, outcome, status, stdout, stderr,
    /// seconds, error), as each finishes.
    #[arg(long, help_heading = "Many VMs")]
    pub json: bool,
    /// With many VMs: send our stdin to every VM's command (read in full first). Without it,
    /// the commands get no input.
    #[arg(long, help_heading = "Many VMs")]
    pub stdin: bool,
    #[command(flatten)]
    pub fanout: FanoutArgs,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

/// What every command that can work on many VMs at once shares.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Many VMs")]
pub struct FanoutArgs {
    /// Read VM names from FILE, one per line (`#` comments; `-` is stdin). In cp and sync, the
    /// remote operand is then `:PATH`.
    #[arg(long, value_name = "FILE")]
    pub hosts: Option<PathBuf>,
    /// Work on at most N VMs at once.
    #[arg(short = 'f', long = "fanout", value_name = "N", default_value_t = 32)]
    pub fanout: usize,
    /// Stop what runs on a VM after SECS (counted as timed out; exit status 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Write the names of the VMs that did not succeed to FILE (for a rerun with --hosts).
    #[arg(long, value_name = "FILE")]
    pub failed: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    override_usage = "vtun cp [OPTIONS] SRC... DST",
    after_help = "Examples:\n  \
        vtun cp -r ./dist infra:/srv/app/dist      upload a tree\n  \
        vtun cp vm1:/var/log/app.log .             download a file\n  \
        vtun cp -r vm1:/data vm2:/data              VM to VM, streamed through this machine\n  \
        vtun cp --resume big.img vm1:/images/      continue an interrupted large upload"
)]
pub struct CpArgs {
    /// Copy directories recursively (symlinks inside are copied as links).
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Preserve modification times (modes are always kept for new files).
    #[arg(short = 'p', long)]
    pub preserve: bool,
    /// Continue an interrupted copy from its temporary partial file.
    #[arg(long)]
    pub resume: bool,
    /// Parallel channels for large files and many small ones (sshd allows 10 per connection by
    /// default, MaxSessions; extra ones share a channel).
    #[arg(long, default_value_t = 8, value_name = "N", env = "VTUN_PARALLEL")]
    pub parallel: usize,
    /// Print a JSON summary (files, bytes, seconds, MB/s) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Sources, then the destination (`VM:PATH` or a local path).
    #[arg(value_name = "PATH", num_args = 2.., required = true)]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub fanout: FanoutArgs,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    vtun sync ./app/ infra:/srv/app/                          contents of ./app into /srv/app\n  \
    vtun sync --delete --exclude .git --exclude node_modules ./ vm:/srv/app/\n  \
    vtun sync -n -i ./site/ web:/var/www/                    show what would change\n  \
    vtun sync vm1:/data/ vm2:/data/                           VM to VM\n\n\
    Exit status (as rsync's): 0 all synced; 23 some entries failed, each named on stderr, the\n\
    rest synced (a file that changed while being read is one); 24 the only failures were source\n\
    files that vanished before they could be sent; 255 the connection failed.")]
pub struct SyncArgs {
    /// Private key file to authenticate with (repeatable; `-i` means --itemize here).
    #[arg(
        long = "identity",
        env = "VTUN_IDENTITY",
        value_name = "FILE",
        value_delimiter = ':'
    )]
    pub identity: Vec<PathBuf>,
    /// Show what would change; change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Delete destination entries that are not in the source.
    #[arg(long)]
    pub delete: bool,
    /// With --delete, also delete excluded destination entries.
    #[arg(long)]
    pub delete_excluded: bool,
    /// Skip paths matching PATTERN (rsync rules; repeatable).
    ///
    /// A leading `/` anchors at the transfer root, a trailing `/` matches only directories, `*`
    /// stays within a path segment, `**` crosses segments. Without a `/`, it matches a name at
    /// any depth.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Read exclude patterns from FILE (one per line; `#` comments).
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Compare content hashes instead of size and mtime.
    #[arg(short = 'c', long)]
    pub checksum: bool,
    /// Compare sizes only.
    #[arg(long, conflicts_with = "checksum")]
    pub size_only: bool,
    /// Print a line per change, rsync style (`>f+++++++++ path`).
    #[arg(short = 'i', long)]
    pub itemize: bool,
    /// Never use the remote agent; copy whole files over SFTP.
    ///
    /// No delta transfer and no -c then. SFTP has no directory-relative operations, so remote
    /// writes go by path after an lstat of each parent: the agent's descent by directory
    /// descriptor is what keeps a symlink swapped in mid-run from redirecting a write.
    #[arg(long)]
    pub no_agent: bool,
    /// SSH channels per side (one connection each) for file contents when there is much to
    /// send: enough to get past OpenSSH's fixed 2 MiB channel window on high-latency links.
    ///
    /// sshd allows 10 channels per connection by default (MaxSessions).
    #[arg(long, default_value_t = 8, value_name = "N", env = "VTUN_PARALLEL")]
    pub parallel: usize,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Source tree (trailing `/`: its contents).
    #[arg(value_name = "SRC")]
    pub src: String,
    /// Destination directory.
    #[arg(value_name = "DST")]
    pub dst: String,
    #[command(flatten)]
    pub fanout: FanoutArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Bytes to move each way (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_name = "SIZE")]
    pub size: String,
    /// Parallel channels for the parallel run.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub parallel: usize,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The VM: [user@]NAME (an id, a vers alias or HEAD).
    #[arg(value_name = "VM")]
    pub vm: String,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443", value_name = "ADDR")]
    pub listen: String,
    /// Route server names matching PATTERN to BACKEND host:port (repeatable; first match wins).
    ///
    /// PATTERN is an exact name or `*.suffix`, e.g. `--route '*.vm.test=127.0.0.1:22'`.
    #[arg(long = "route", value_name = "PATTERN=BACKEND", required = true)]
    pub routes: Vec<String>,
    /// Certificate chain (PEM).
    #[arg(
        long,
        value_name = "PEM",
        requires = "key",
        conflicts_with = "self_signed"
    )]
    pub cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Create (once) a CA and a certificate for the route names in DIR and serve it.
    ///
    /// Clients trust it with --ca-file DIR/ca.pem.
    #[arg(long, value_name = "DIR")]
    pub self_signed: Option<PathBuf>,
    /// Testing aid: add N ms of one-way delay in each direction (N*2 ms round trip).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub delay_ms: u64,
    /// Testing aid: cut connections idle (no bytes either way) for SECS.
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<f64>,
    /// Close connections that have not completed the TLS handshake within SECS.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub handshake_timeout: f64,
    /// Serve at most N connections at once; more are closed as they arrive.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_connections: usize,
    /// Print the listening address on stdout once ready (for scripts using port 0).
    #[arg(long)]
    pub print_addr: bool,
}

#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// Host pattern for the block [default: *.<domain>].
    #[arg(long, value_name = "PATTERN")]
    pub host: Option<String>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// Parse the process arguments (exits with clap's usage error on bad input).
pub fn parse() -> Cli {
    Cli::parse()
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sync_dash_i_is_itemize() {
        let cli = Cli::try_parse_from(["vtun", "sync", "-i", "a/", "vm:b"]).unwrap();
        match cli.command {
            Command::Sync(s) => assert!(s.itemize),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn ssh_without_a_vm_means_head() {
        let cli = Cli::try_parse_from(["vtun", "ssh"]).unwrap();
        match cli.command {
            Command::Ssh(s) => assert_eq!((s.vm, s.command.len()), (None, 0)),
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["vtun", "--no-resume", "ssh", "HEAD", "uptime"]).unwrap();
        assert!(cli.global.no_resume);
        match cli.command {
            Command::Ssh(s) => assert_eq!(s.vm.as_deref(), Some("HEAD")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn forward_needs_a_forward_and_ssh_takes_them_before_the_command() {
        assert!(Cli::try_parse_from(["vtun", "forward", "vm"]).is_err());
        let cli = Cli::try_parse_from([
            "vtun", "forward", "vm", "-L", "1:h:2", "-D", "3", "-L", "4:h:5",
        ])
        .unwrap();
        match cli.command {
            Command::Forward(f) => {
                assert_eq!(f.forwards.local, ["1:h:2", "4:h:5"]);
                assert_eq!(f.forwards.dynamic, ["3"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "vtun", "ssh", "-R", "0:h:1", "vm", "-L", "1:h:2", "ls", "-L",
        ])
        .unwrap();
        match cli.command {
            Command::Ssh(s) => {
                assert_eq!(s.forwards.remote, ["0:h:1"]);
                assert_eq!(s.forwards.local, ["1:h:2"]);
                assert_eq!(s.command, ["ls", "-L"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn global_options_after_subcommand() {
        let cli = Cli::try_parse_from(["vtun", "proxy", "h", "--connect", "127.0.0.1:1"]).unwrap();
        assert_eq!(cli.global.connect.as_deref(), Some("127.0.0.1:1"));
    }
}
