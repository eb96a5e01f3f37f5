//! End-to-end tests for tidemark: real daemons, real NBD clients, real
//! filesystems. They arrive with the daemon; until then the journal's own
//! crash, corruption and model tests live in `journal/tests/`.
