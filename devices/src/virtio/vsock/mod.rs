//! Coming next.
