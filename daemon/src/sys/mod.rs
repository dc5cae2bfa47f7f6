//! Small wrappers over the operating system that several layers need and none owns: the
//! mount table and mount/unmount calls ([`mounts`]), and whole-file writes and stable digests
//! ([`files`]). Nothing here knows about volumes, engines or the store.

pub mod files;
pub mod mounts;
