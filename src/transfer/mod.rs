//! Moving file contents: pipelined SFTP, parallel channels, atomic writes. Used by cp and sync.
