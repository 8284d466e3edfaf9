//! Helpers shared by vmbalancer's test programs and integration tests.

pub mod actuate_target;
pub mod lab;
