//! Helpers shared by vmbalancer's test programs and integration tests.

pub mod lab;
