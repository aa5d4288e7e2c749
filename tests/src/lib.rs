//! Shared helpers live in the test files; this crate only hosts end-to-end tests.
