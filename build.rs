// The same probe as the activities crate (whether the qemu tests can run here): see
// activities/build.rs.
include!("activities/build.rs");
