//! `vmbalancer run`: the tick loop, action journal, control socket and configuration.
