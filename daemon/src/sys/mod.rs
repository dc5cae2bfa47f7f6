//! Small wrappers over the operating system that several layers need and none owns: the
//! mount table and mount/unmount calls ([`mounts`]), whole-file writes, private directories
//! and digests ([`files`]), and sockets born private with their peers checked ([`sockets`]).
//! Nothing here knows about volumes, engines or the store.

pub mod files;
pub mod mounts;
pub mod sockets;
