//! The pure policy engine: a [`Snapshot`](crate::model::Snapshot) in, a
//! [`Plan`](crate::model::Plan) out. No I/O, no clock, no randomness.
