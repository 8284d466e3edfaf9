//! The `vmbalancer` binary: parses the command line and hands over to [`balancer::cli`].

fn main() -> anyhow::Result<()> {
    balancer::cli::main()
}
