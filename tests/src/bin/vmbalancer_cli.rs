//! The `vmbalancer` command line, built inside the test crate so that integration
//! tests get its path from Cargo (`CARGO_BIN_EXE_vmbalancer_cli`) and it is always
//! rebuilt before they run. Same code as the `vmbalancer` binary.

fn main() -> anyhow::Result<()> {
    balancer::cli::main()
}
