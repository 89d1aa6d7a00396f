//! Progress on stderr when it is a terminal, silence in pipes, and `--json` summaries.
