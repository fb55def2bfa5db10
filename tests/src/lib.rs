//! Shared test support for marina: echo servers, scriptable connectors.
